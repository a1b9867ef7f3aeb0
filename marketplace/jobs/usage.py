"""Usage samples: GPU time an agent measured for one of its allocations.

Samples belong to jobs (they measure allocations); billing rates them into the ledger, told
through ``ports.usage_due`` when an allocation's usage should be posted at once."""

from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from marketplace.jobs import ports
from marketplace.jobs.models import Allocation, UsageSample

# Samples per INSERT: five parameters a row stays well under SQLite's 32,766 and PostgreSQL's 65,535.
INSERT_ROWS = 1000


@dataclass(frozen=True)
class SampleReport:
    seq: int
    gpu_ms: int
    recorded_at: datetime


def usage_record(*, allocation: Allocation, samples: list[SampleReport]) -> tuple[int, int]:
    """Store the agent's samples; a (allocation, seq) already stored, or repeated within the
    batch (the first one counts), is a duplicate and ignored. Returns (accepted, duplicates).
    One statement (a batch the agent sends fits in one) needs no transaction of its own."""
    unique = list({sample.seq: sample for sample in reversed(samples)}.values())
    with transaction.atomic() if len(unique) > INSERT_ROWS else nullcontext():
        accepted = sum(
            _samples_insert(allocation.pk, unique[start : start + INSERT_ROWS])
            for start in range(0, len(unique), INSERT_ROWS)
        )
    if accepted and settings.USAGE_POSTING_INTERVAL_S <= 0:
        ports.usage_due(allocation.pk)  # otherwise the rating sweep posts it within the interval
    return accepted, len(samples) - accepted


# Table and columns are fixed by the model; only the VALUES placeholders vary with the batch.
SAMPLES_INSERT = (
    "INSERT INTO {table} (allocation_id, seq, gpu_ms, recorded_at, received_at) VALUES {rows} "
    "ON CONFLICT (allocation_id, seq) DO NOTHING RETURNING seq"
)


def _samples_insert(allocation_id, samples: list[SampleReport]) -> int:
    """Insert in one statement, skipping (allocation, seq) pairs already stored; returns how many
    rows were new. RETURNING lists only the rows this statement inserted (PostgreSQL, SQLite >=
    3.35), so the count stays exact when the same samples arrive concurrently: the second
    statement waits for the first and then skips its rows."""
    prep = connection.ops.adapt_datetimefield_value
    allocation_id = UsageSample._meta.get_field("allocation").get_db_prep_save(allocation_id, connection)
    received_at = prep(timezone.now())
    params = []
    for sample in samples:
        params += [allocation_id, sample.seq, sample.gpu_ms, prep(sample.recorded_at), received_at]
    rows = ", ".join(["(%s, %s, %s, %s, %s)"] * len(samples))
    with connection.cursor() as cursor:
        cursor.execute(SAMPLES_INSERT.format(table=UsageSample._meta.db_table, rows=rows), params)
        return len(cursor.fetchall())
