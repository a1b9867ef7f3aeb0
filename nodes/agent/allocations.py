"""An assignment from the server, from acceptance to its final usage sample."""

from dataclasses import dataclass, field
from typing import Any

from nodes.agent.backoff import Backoff
from nodes.agent.gpus import Gpu
from nodes.agent.runtime import Handle, JobSpec


class InvalidAssignment(Exception):
    def __init__(self, message: str, allocation_id: str | None) -> None:
        super().__init__(message)
        self.allocation_id = allocation_id


@dataclass
class Allocation:
    spec: JobSpec
    gpus: tuple[Gpu, ...]
    max_duration_s: float | None
    accepted_at: float
    handle: Handle | None = None
    started_at: float = 0.0
    last_sample_at: float = 0.0
    metered_ms: int = 0
    seq: int = 0
    stop_reason: str | None = None
    next_start_at: float = 0.0
    start_backoff: Backoff = field(default_factory=Backoff)

    @property
    def id(self) -> str:
        return self.spec.allocation_id

    def mark_started(self, handle: Handle, now: float) -> None:
        self.handle = handle
        self.started_at = self.last_sample_at = now

    def overdue(self, now: float) -> bool:
        return self.max_duration_s is not None and now - self.started_at >= self.max_duration_s

    def sample(self, now: float, recorded_at: str) -> dict[str, Any]:
        """The next usage sample: GPU-milliseconds since the previous one.

        Measured from the start on every call, so rounding never accumulates across samples.
        """
        wall_ms = max(self.metered_ms, round((now - self.started_at) * 1000))
        gpu_ms = (wall_ms - self.metered_ms) * len(self.gpus)
        self.metered_ms, self.last_sample_at = wall_ms, now
        self.seq += 1
        return {"seq": self.seq, "gpu_ms": gpu_ms, "recorded_at": recorded_at}


def parse_assignment(data: dict[str, Any], free: dict[str, Gpu], now: float) -> Allocation:
    """Build an Allocation, refusing GPUs we do not have free."""
    allocation_id = data.get("allocation_id")
    try:
        job = data["job"]
        uuids = tuple(str(gpu["uuid"]) for gpu in data["gpus"])
        spec = JobSpec(
            allocation_id=str(allocation_id),
            job_id=str(job["id"]),
            image=str(job.get("image", "")),
            command=tuple(_argv(job["command"])),
            gpu_uuids=uuids,
        )
        max_duration = job.get("max_duration_s")
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidAssignment(f"malformed assignment: {exc!r}", allocation_id) from None
    if allocation_id is None:
        raise InvalidAssignment("assignment without allocation_id", None)
    unknown = [u for u in uuids if u not in free]
    if unknown or not uuids or len(set(uuids)) != len(uuids):
        raise InvalidAssignment(f"GPUs not free here: {unknown or list(uuids)}", spec.allocation_id)
    return Allocation(
        spec=spec,
        gpus=tuple(free[u] for u in uuids),
        max_duration_s=float(max_duration) if max_duration else None,
        accepted_at=now,
    )


def _argv(command: Any) -> list[str]:
    if not isinstance(command, list) or not all(isinstance(arg, str) for arg in command):
        raise ValueError("command must be a list of strings")
    return command
