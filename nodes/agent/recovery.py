"""What a restarted agent needs to find its jobs again: one file per started allocation.

A record is written just before the runtime starts the job (with no handle yet: a restart
that finds it asks the runtime to find the job by its allocation, which a container runtime can)
and rewritten after each usage sample and log chunk, always *after* those reports are
in the outbox: after a crash the outbox may be one step ahead of a record but never behind it,
and `Journal.recover` folds such reports back in, so no seq is reused and no time billed twice.
"""

import logging
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from nodes.agent import files, logs
from nodes.agent.allocations import Allocation
from nodes.agent.gpus import Gpu
from nodes.agent.outbox import Outbox, Report
from nodes.agent.runtime import Adoptable, Adopted, JobSpec, Runtime

logger = logging.getLogger(__name__)
VERSION = 1


@dataclass(frozen=True)
class Recovered:
    """`allocation` None: the job is gone without a trace. `exit_code` set: it ended while we were away."""

    allocation_id: str
    allocation: Allocation | None
    exit_code: int | None = None


class Journal:
    """Records of running allocations. Without a folder, or with a runtime that cannot adopt
    jobs, it keeps nothing and a restart finds nothing."""

    def __init__(self, directory: Path | None, runtime: Runtime) -> None:
        adoptable = isinstance(runtime, Adoptable)
        self._dir = files.private_dir(directory) if directory is not None and adoptable else None
        self._runtime = runtime

    def save(self, allocation: Allocation) -> None:
        if self._dir is None or allocation.handle is None:
            return
        assert isinstance(self._runtime, Adoptable)
        files.write_json(self._path(allocation.id), record_of(allocation, self._runtime.describe(allocation.handle)))

    def save_starting(self, allocation: Allocation) -> None:
        """The record of a job about to be started: an agent killed while its runtime creates the
        container must find that container again, not leave it running unbilled."""
        if self._dir is not None:
            files.write_json(self._path(allocation.id), record_of(allocation, {}))

    def forget(self, allocation_id: str) -> None:
        if self._dir is not None:
            files.remove(self._path(allocation_id))

    def recover(self, outbox: Outbox, gpus: list[Gpu], now: float, wall_now: str) -> list[Recovered]:
        """Each recorded allocation as it really is now; `now` is the monotonic clock."""
        if self._dir is None:
            return []
        files.clear_temporaries(self._dir)
        found = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                record = _fold(files.read_json(path), [r for r in outbox if r.allocation_id == path.stem])
                if record is None:
                    self.forget(path.stem)  # its finish is already on its way
                    continue
                found.append(self._adopt(path.stem, record, gpus, now, wall_now))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Set aside for a person; the server gives up on the allocation after its grace period.
                path.rename(path.with_suffix(".bad"))
                logs.event(logger, "record_unreadable", logging.ERROR, file=path.name, error=exc)
        return found

    def _adopt(self, allocation_id: str, record: dict[str, Any], gpus: list[Gpu], now: float, wall: str) -> Recovered:
        assert isinstance(self._runtime, Adoptable)
        spec = spec_from(record["spec"])
        adopted = self._runtime.adopt(spec, record["handle"])
        if adopted is None:
            return Recovered(allocation_id, None)
        until = epoch(wall) if adopted.exited_at is None else adopted.exited_at
        allocation = restore(record, spec, adopted, gpus, now, until or 0.0)
        return Recovered(allocation_id, allocation, adopted.exit_code)

    def _path(self, allocation_id: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{allocation_id}.json"


def record_of(allocation: Allocation, handle: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": VERSION,
        "spec": asdict(allocation.spec),
        "max_duration_s": allocation.max_duration_s,
        "handle": handle,
        "seq": allocation.seq,
        "metered_ms": allocation.metered_ms,
        "sampled_at": allocation.sampled_at,
        "log_offset": allocation.log_offset,
        "stop_reason": allocation.stop_reason,
    }


def restore(
    record: dict[str, Any], spec: JobSpec, adopted: Adopted, gpus: list[Gpu], now: float, until: float
) -> Allocation:
    """The allocation as it was at its last sample, metering on from then until `until` (Unix
    time): the job ran all along, so the time the agent was away is billed, once."""
    allocation = Allocation(
        spec=spec,
        gpus=gpus_for(spec, gpus),
        max_duration_s=record["max_duration_s"],
        accepted_at=now,
        handle=adopted.handle,
        metered_ms=record["metered_ms"],
        seq=record["seq"],
        stop_reason=record["stop_reason"],
        sampled_at=record["sampled_at"],
        log_offset=record["log_offset"],
    )
    # A record written before the start has no sample: the job's time counts from its start.
    since = epoch(record["sampled_at"]) if record["sampled_at"] else adopted.started_at
    away_ms = 0 if since is None else max(0, round((until - since) * 1000))
    allocation.started_at = now - (allocation.metered_ms + away_ms) / 1000
    allocation.last_sample_at = now - away_ms / 1000
    return allocation


def spec_from(data: dict[str, Any]) -> JobSpec:
    known = {f.name for f in fields(JobSpec)}
    return JobSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})


def gpus_for(spec: JobSpec, inventory: list[Gpu]) -> tuple[Gpu, ...]:
    by_uuid = {gpu.uuid: gpu for gpu in inventory}
    # A device missing from today's inventory still counts for metering and stays busy.
    return tuple(by_uuid.get(u) or Gpu(index=-1, uuid=u, model="unknown", vram_mb=1) for u in spec.gpu_uuids)


def epoch(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _fold(record: dict[str, Any], reports: list[Report]) -> dict[str, Any] | None:
    """The record brought up to date with its reports still in the outbox; None once finished."""
    record = dict(record)
    for report in reports:
        if report.kind == "finish":
            return None
        if report.kind == "logs":
            record["log_offset"] = max(record["log_offset"], report.body["end"])
            continue
        if report.kind == "staging":
            continue
        record["seq"] = max(record["seq"], report.body["seq"])
        sampled, since = epoch(report.body["recorded_at"]), epoch(record["sampled_at"])
        if sampled is not None and (since is None or sampled > since):
            record["metered_ms"] += 0 if since is None else round((sampled - since) * 1000)
            record["sampled_at"] = report.body["recorded_at"]
    return record
