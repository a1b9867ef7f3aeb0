"""The running agent's status file (`<state_dir>/status.json`), written by the loop and read by
`shedshare-agent status`, so that an owner can ask a running agent how it is without an API."""

import json
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodes.agent import files, logs
from nodes.agent.allocations import Allocation
from nodes.agent.gpus import Gpu
from nodes.agent.heartbeat import Heartbeater

logger = logging.getLogger(__name__)
FILENAME = "status.json"


class StatusWriter:
    """Rewrites the file after every heartbeat attempt and whenever jobs or limits change."""

    def __init__(
        self,
        path: Path,
        gpus: list[Gpu],
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._gpus = [gpu.as_report() for gpu in gpus]
        self._clock, self._now = clock, now
        self._started_at = iso(now())
        self._attempts = 0
        self._last_attempt_at: str | None = None
        self._last_ok_at: str | None = None
        self._seen: tuple[Any, ...] | None = None

    def update(
        self,
        heartbeater: Heartbeater,
        allocations: Collection[Allocation],
        limits: Mapping[str, Any],
        connection: str = "http polling",
    ) -> None:
        seen = (
            heartbeater.attempts,
            connection,
            tuple((a.id, a.handle is not None) for a in allocations),
            json.dumps(limits, sort_keys=True, default=str),
        )
        if seen == self._seen:
            return
        self._seen = seen
        if heartbeater.attempts != self._attempts:
            self._attempts, self._last_attempt_at = heartbeater.attempts, iso(self._now())
            self._last_ok_at = self._last_attempt_at if heartbeater.healthy else self._last_ok_at
        try:
            files.write_json(self.path, self._snapshot(heartbeater, allocations, limits) | {"connection": connection})
        except OSError as exc:
            logs.event(logger, "status_write_failed", logging.WARNING, path=self.path, error=exc)

    def _snapshot(
        self, heartbeater: Heartbeater, allocations: Collection[Allocation], limits: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": self._started_at,
            "updated_at": iso(self._now()),
            "last_heartbeat_at": self._last_attempt_at,
            "last_heartbeat_ok_at": self._last_ok_at,
            "last_heartbeat_error": heartbeater.last_error,
            "server_status": heartbeater.server_status,
            "allocations": [self._allocation(a) for a in allocations],
            "limits": dict(limits),
            "gpus": self._gpus,
        }

    def _allocation(self, allocation: Allocation) -> dict[str, Any]:
        started = allocation.handle is not None
        # Allocations keep monotonic times; the status file wants wall-clock ones.
        started_at = self._now() - (self._clock() - allocation.started_at) if started else None
        return {
            "id": allocation.id,
            "job_id": allocation.spec.job_id,
            "gpus": [gpu.index for gpu in allocation.gpus],
            "state": "running" if started else "starting",
            "started_at": iso(started_at) if started_at is not None else None,
        }


def read(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = files.read_json(state_dir / FILENAME)
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, but another user's
    return True


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
