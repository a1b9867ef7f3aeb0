"""Heartbeats at the server's cadence, jittered; a shorter, backing-off cadence after errors."""

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from nodes.agent import logs
from nodes.agent.backoff import Backoff, jittered
from nodes.agent.client import AgentClient, AgentError
from nodes.agent.gpus import Gpu

logger = logging.getLogger(__name__)


class Heartbeater:
    def __init__(
        self,
        client: AgentClient,
        gpus: list[Gpu],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        error_base_s: float = 1.0,
        country: str | None = None,
    ) -> None:
        self.interval_s = 5.0
        self.country = country  # the country the owner configured, reported with every beat
        self.healthy = False
        self.attempts = 0  # with server_status and last_error, what `shedshare-agent status` shows
        self.server_status: str | None = None
        self.last_error: str | None = None
        self.policy: dict[str, Any] | None = None  # the owner's policy, as the last answer carried it
        # Of the allocations the last answer asked to stop, those it asked to stop for an
        # on-demand job (`preempt`): stopped as "preempted", so the server re-queues them.
        self.preempting: set[str] = set()
        self._client = client
        self._reports = [gpu.as_report() for gpu in gpus]
        self._clock = clock
        self._rng = rng
        self._backoff = Backoff(base_s=error_base_s, cap_s=self.interval_s, rng=rng)
        self._next_at = 0.0

    def beat_now(self) -> None:
        """Make the next heartbeat due at once (what it carries changed)."""
        self._next_at = min(self._next_at, self._clock())

    def due(self) -> bool:
        return self._clock() >= self._next_at

    def beat_if_due(
        self,
        running: list[str],
        *,
        gpus: list[Gpu] | None = None,
        advertise: list[str] | None = None,
        limits: dict[str, Any] | None = None,
    ) -> list[str]:
        """Send a heartbeat when one is due, with fresh readings and what the unit offers now if
        given; return the allocations the server wants stopped: those it cancels (`cancel`), then
        those it preempts (`preempt`, which older servers never send), each once. An id in
        `preempt`, whether or not also in `cancel`, lands in `preempting`."""
        now = self._clock()
        if now < self._next_at:
            return []
        if gpus is not None:
            self._reports = [gpu.as_report() for gpu in gpus]
        self.attempts += 1
        try:
            reply = self._client.heartbeat(
                gpus=self._reports, running=running, advertise=advertise, limits=limits, country=self.country
            )
        except AgentError as exc:
            self._failed(now, exc)
            return []
        if not self.healthy:
            logs.event(logger, "heartbeat_ok", status=reply.get("status"))
        self.healthy, self.last_error = True, None
        self._backoff.success()
        self._next_at = now + jittered(self._took(reply), 0.1, self._rng)
        return self._to_stop(reply)

    def pushed(self, state: dict[str, Any]) -> list[str]:
        """Take a state the server pushed over the stream as the answer to a heartbeat (it pushes
        one when something changed: a cancel, a preemption, the policy, the unit's status); return
        the allocations to stop, as beat_if_due does. A shorter cadence applies at once."""
        interval_s = self._took(state)
        self._next_at = min(self._next_at, self._clock() + jittered(interval_s, 0.1, self._rng))
        return self._to_stop(state)

    def _took(self, reply: dict[str, Any]) -> float:
        self.server_status = reply.get("status", self.server_status)
        if "policy" in reply:
            self.policy = reply["policy"]
        self.interval_s = max(0.1, float(reply.get("heartbeat_interval_s") or self.interval_s))
        return self.interval_s

    def _to_stop(self, reply: dict[str, Any]) -> list[str]:
        cancel = [str(allocation_id) for allocation_id in reply.get("cancel") or []]
        preempt = [str(allocation_id) for allocation_id in reply.get("preempt") or []]
        self.preempting = set(preempt)
        return list(dict.fromkeys([*cancel, *preempt]))

    def _failed(self, now: float, exc: AgentError) -> None:
        self.healthy, self.last_error = False, str(exc)
        # Errors never make us beat less often than the normal cadence, so a short outage
        # does not cost the unit its online status once the server answers again.
        self._backoff.cap_s = self.interval_s
        delay = self._backoff.failure(at_least=getattr(exc, "retry_after", 0.0))
        self._next_at = now + delay
        logs.event(logger, "heartbeat_failed", logging.WARNING, retry_in_s=round(delay, 2), error=exc)
