"""Reports waiting for the server, oldest first, kept on disk until the server has them.

One small file per report, named by a number that only grows, written atomically before the
report is ever sent: a crash or kill -9 loses nothing, and a restarted agent sends what was
not acknowledged. Sending a report twice is harmless because the server takes usage once per
(allocation, seq), logs once per (allocation, offset), and a second finish changes nothing.

The outbox is bounded by `max_reports`. Past it, a new usage sample is merged into the newest
sample of the same allocation that has never been sent (keeping that sample's seq, so the
server sees a gap in seqs but the same GPU time). Finish, staging and log reports are always
kept: there is one finish and at most two staging reports per job, and the log shipper caps the
bytes it queues per job.
"""

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from nodes.agent import files, logs

logger = logging.getLogger(__name__)
MAX_SAMPLES_PER_CALL = 100
MAX_REPORTS = 10_000
MAX_SAMPLE_GPU_MS = 64 * 3_600_000  # the most GPU time the server takes in one sample


@dataclass(frozen=True)
class Report:
    kind: Literal["usage", "logs", "finish", "staging"]
    allocation_id: str
    body: dict[str, Any]


@dataclass
class _Entry:
    number: int
    report: Report


class Outbox:
    """With `directory` None the reports live in memory only (tests of other parts)."""

    def __init__(self, directory: Path | None = None, *, max_reports: int = MAX_REPORTS) -> None:
        self._dir = files.private_dir(directory) if directory is not None else None
        self._max = max_reports
        self._items: deque[_Entry] = deque()
        self._next = 1
        self._maybe_sent = 0  # entries up to this number may have reached the server
        if self._dir is not None:
            self._load(self._dir)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Report]:
        return (entry.report for entry in self._items)

    def add(self, report: Report) -> None:
        if len(self._items) >= self._max and report.kind == "usage" and self._merge(report):
            return
        entry = _Entry(self._next, report)
        self._next += 1
        self._write(entry)
        self._items.append(entry)

    def batch(self) -> list[Report]:
        """The oldest report, plus the usage reports right behind it for the same allocation."""
        head = self._items[0]
        batch = [head]
        if head.report.kind == "usage":
            for entry in islice(self._items, 1, MAX_SAMPLES_PER_CALL):
                if entry.report.kind != "usage" or entry.report.allocation_id != head.report.allocation_id:
                    break
                batch.append(entry)
        self._maybe_sent = max(self._maybe_sent, batch[-1].number)
        return [entry.report for entry in batch]

    def allocation_ids(self) -> list[str]:
        """Allocations with reports still to deliver, in order of their first report."""
        return list(dict.fromkeys(entry.report.allocation_id for entry in self._items))

    def drop(self, count: int) -> None:
        for _ in range(count):
            entry = self._items.popleft()
            if self._dir is not None:
                # No folder sync: a file that reappears after a crash is only sent again.
                files.remove(self._path(entry.number))

    def _merge(self, report: Report) -> bool:
        last = next((e for e in reversed(self._items) if e.report.allocation_id == report.allocation_id), None)
        # A sample that may have reached the server must keep its content, or its seq would
        # be counted with the old GPU time and the merged-in time lost.
        if last is None or last.report.kind != "usage" or last.number <= self._maybe_sent:
            return False
        gpu_ms = last.report.body["gpu_ms"] + report.body["gpu_ms"]
        if gpu_ms > MAX_SAMPLE_GPU_MS:
            return False
        merged = {**report.body, "seq": last.report.body["seq"], "gpu_ms": gpu_ms}
        last.report = Report("usage", report.allocation_id, merged)
        self._write(last)
        return True

    def _path(self, number: int) -> Path:
        assert self._dir is not None
        return self._dir / f"{number:012d}.json"

    def _write(self, entry: _Entry) -> None:
        if self._dir is not None:
            report = entry.report
            data = {"kind": report.kind, "id": report.allocation_id, "body": report.body}
            files.write_json(self._path(entry.number), data)

    def _load(self, directory: Path) -> None:
        files.clear_temporaries(directory)
        numbered = sorted((int(path.stem), path) for path in directory.glob("*.json") if path.stem.isdigit())
        for number, path in numbered:
            try:
                data = files.read_json(path)
                report = Report(data["kind"], str(data["id"]), dict(data["body"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Kept aside for a person to look at, so one bad file never blocks the rest.
                path.rename(path.with_suffix(".bad"))
                logs.event(logger, "report_unreadable", logging.ERROR, file=path.name, error=exc)
                continue
            self._items.append(_Entry(number, report))
        self._next = self._maybe_sent = max((number for number, _ in numbered), default=0)
        self._next += 1
        if self._items:
            logs.event(logger, "reports_reloaded", pending=len(self._items))
