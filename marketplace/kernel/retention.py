"""Retention: the time budget every retention task runs within, and audit events older than
RETENTION_AUDIT_DAYS archived to gzip JSON lines, then deleted.

The audit table is append-only on PostgreSQL (marketplace/kernel/appendonly.py): its trigger
refuses every UPDATE, and a DELETE unless the transaction has first said up to when the rows are
archived (``SET LOCAL shedshare.audit_archived_before``) and the row is older than that. Only
this module says it, and only after the rows are safely in a file, so a bug, an admin edit or a
stray query still cannot remove history; an operator running the SQL by hand knows what they did.

Each batch is written to its own file under RETENTION_ARCHIVE_DIR/audit, named by the first and
last id in it, through a temporary file that is synced and then renamed; the rows are deleted only
after that. A crash between the two writes the same file again on the next run.
"""

import gzip
import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from marketplace.kernel.metrics import RETENTION_ROWS
from marketplace.kernel.models import AuditEvent

FIELDS = ("id", "action", "subject_id", "actor", "data", "created_at")


class Budget:
    """Time left to one task run (each under CELERY_TASK_SOFT_TIME_LIMIT): the retention steps
    stop between batches once ``seconds`` have gone by, and the next run goes on from there.
    ``None``: no limit (the benchmark, the tests)."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.ends = clock, None if seconds is None else clock() + seconds

    def left(self) -> bool:
        return self.ends is None or self.clock() < self.ends


def rows_prune(old, budget: Budget) -> int:
    """Delete the rows of the queryset ``old`` RETENTION_BATCH a statement (each its own
    transaction), oldest pk first, while the budget lasts; returns how many went."""
    model, deleted = old.model, 0
    while budget.left():
        ids = list(old.order_by("pk").values_list("pk", flat=True)[: settings.RETENTION_BATCH])
        if not ids:
            break
        count, _ = model.objects.filter(pk__in=ids).delete()
        deleted += count
        RETENTION_ROWS.labels(table=model._meta.db_table, action="pruned").inc(count)
    return deleted


def archive_dir() -> Path:
    return Path(settings.RETENTION_ARCHIVE_DIR) / "audit"


def audit_events_archive(*, now: datetime | None = None, budget: Budget | None = None) -> int:
    """Archive and delete audit events older than RETENTION_AUDIT_DAYS, RETENTION_BATCH a file
    and a transaction, oldest first; returns how many went."""
    now, budget = now or timezone.now(), budget or Budget(None)
    cutoff = now - timedelta(days=settings.RETENTION_AUDIT_DAYS)
    old = AuditEvent.objects.filter(created_at__lt=cutoff).order_by("id")
    archived = 0
    while budget.left():
        rows = list(old.values(*FIELDS)[: settings.RETENTION_BATCH])
        if not rows:
            break
        _archive_write(rows)
        _archived_delete([row["id"] for row in rows], before=cutoff)
        archived += len(rows)
        RETENTION_ROWS.labels(table=AuditEvent._meta.db_table, action="archived").inc(len(rows))
    return archived


def _archive_write(rows: list[dict]) -> Path:
    folder = archive_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"audit-{rows[0]['created_at']:%Y%m%d}-{rows[0]['id']}-{rows[-1]['id']}.jsonl.gz"
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
            for row in rows:
                out.write(json.dumps(row, default=str, sort_keys=True).encode() + b"\n")
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(partial, path)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
    return path


@transaction.atomic
def _archived_delete(ids: list[int], *, before: datetime) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('shedshare.audit_archived_before', %s, true)", [before.isoformat()])
    AuditEvent.objects.filter(pk__in=ids, created_at__lt=before).delete()
