"""Usage and finish reports, delivered in order and retried until the server has them."""

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

from nodes.agent import logs
from nodes.agent.backoff import Backoff
from nodes.agent.client import AgentClient, AgentError

logger = logging.getLogger(__name__)
MAX_SAMPLES_PER_CALL = 100


@dataclass(frozen=True)
class Report:
    kind: Literal["usage", "finish"]
    allocation_id: str
    body: dict[str, Any]


class Outbox:
    """Reports waiting for the server, oldest first.

    In memory for now. A disk-backed outbox will keep this interface (add, batch, drop), and
    because reports are plain JSON it can write them as they are.
    """

    def __init__(self) -> None:
        self._items: deque[Report] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, report: Report) -> None:
        self._items.append(report)

    def batch(self) -> list[Report]:
        """The oldest report, plus the usage reports right behind it for the same allocation."""
        head = self._items[0]
        batch = [head]
        if head.kind == "usage":
            for report in islice(self._items, 1, MAX_SAMPLES_PER_CALL):
                if report.kind != "usage" or report.allocation_id != head.allocation_id:
                    break
                batch.append(report)
        return batch

    def allocation_ids(self) -> list[str]:
        """Allocations with reports still to deliver, in order of their first report."""
        return list(dict.fromkeys(report.allocation_id for report in self._items))

    def drop(self, count: int) -> None:
        for _ in range(count):
            self._items.popleft()


class Reporter:
    def __init__(
        self,
        client: AgentClient,
        outbox: Outbox,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
    ) -> None:
        self.outbox = outbox
        self._client = client
        self._clock = clock
        self._backoff = backoff or Backoff(base_s=1.0, cap_s=60.0)
        self._next_try_at = 0.0

    def usage(self, allocation_id: str, sample: dict[str, Any]) -> None:
        self.outbox.add(Report("usage", allocation_id, sample))

    def finish(self, allocation_id: str, exit_code: int | None, reason: str) -> None:
        self.outbox.add(Report("finish", allocation_id, {"exit_code": exit_code, "reason": reason}))

    def flush(self, max_calls: int = 10) -> None:
        for _ in range(max_calls):
            if not self.outbox or self._clock() < self._next_try_at:
                return
            batch = self.outbox.batch()
            try:
                self._send(batch)
            except AgentError as exc:
                if exc.retryable:
                    self._retry_later(exc)
                    return
                head = batch[0]
                logs.event(
                    logger,
                    "report_dropped",
                    logging.ERROR,
                    kind=head.kind,
                    allocation=head.allocation_id,
                    count=len(batch),
                    error=exc,
                )
            else:
                self._backoff.success()
            self.outbox.drop(len(batch))

    def _send(self, batch: list[Report]) -> None:
        head = batch[0]
        if head.kind == "finish":
            self._client.finish(head.allocation_id, **head.body)
            logs.event(logger, "finish_reported", allocation=head.allocation_id, **head.body)
        else:
            self._client.usage(head.allocation_id, [report.body for report in batch])
            logs.event(logger, "usage_reported", logging.DEBUG, allocation=head.allocation_id, samples=len(batch))

    def _retry_later(self, exc: AgentError) -> None:
        delay = self._backoff.failure(at_least=getattr(exc, "retry_after", 0.0))
        self._next_try_at = self._clock() + delay
        logs.event(
            logger, "report_failed", logging.WARNING, pending=len(self.outbox), retry_in_s=round(delay, 2), error=exc
        )
