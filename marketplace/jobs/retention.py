"""Retention of the jobs app's growing tables: usage samples rolled up by the hour, then pruned
(row by row on a plain table, a week's partition at a time on PostgreSQL), and log chunks pruned.
Every step works in bounded batches, each its own transaction, and stops when its time is up.

An allocation's samples are rolled up once (1) it was released more than USAGE_DISPUTE_WINDOW_DAYS
ago, with USAGE_LATE_GRACE_S and USAGE_CLOCK_SKEW_S on top, so each of its samples is older than
the window, no sample of it can still be taken (``usage_record`` refuses a batch that late) and
BILLABLE's cut-offs (its stop notice, its release) are fixed for good; and (2) its usage is wholly
rated: the ledger charged the cost of its billable GPU time (``usage_post``'s own sum). Per batch
of allocations, in one transaction: their hours written and the allocations marked
``usage_rolled_up_at``. From then on everything that reads usage (job totals and rating through
``allocations_with_usage``, statements, utilisation, meter events) reads the hours of a rolled-up
allocation and ignores its samples (``NOT_ROLLED_UP``), so a crash anywhere leaves each
allocation counted once, and the samples are deleted afterwards at leisure. Refunds and disputes
(billing/disputes.py) read only the ledger, which is never pruned.
"""

import logging
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Max, Min, Q, Sum
from django.db.models.functions import Coalesce, TruncHour
from django.utils import timezone

from marketplace.jobs import partitions
from marketplace.jobs.models import Allocation, LogChunk, UsageHour, UsageSample
from marketplace.jobs.selectors import allocations_with_usage
from marketplace.jobs.usage import BILLABLE
from marketplace.kernel.metrics import RETENTION_ROWS
from marketplace.kernel.money import usage_cost_micros
from marketplace.kernel.retention import Budget, rows_prune

log = logging.getLogger(__name__)

# Allocations rolled up per transaction: a 30-day allocation has up to 720 hours (and, sampled
# every 10 s, 260,000 samples to sum).
ALLOCATIONS_PER_BATCH = 50


def rollup_cutoff(now: datetime) -> datetime:
    """Allocations released before this have all their samples past the dispute window."""
    late = timedelta(seconds=max(settings.USAGE_LATE_GRACE_S, settings.USAGE_CLOCK_SKEW_S))
    return now - timedelta(days=settings.USAGE_DISPUTE_WINDOW_DAYS) - late


def usage_samples_roll_up(*, now: datetime | None = None, budget: Budget | None = None) -> dict:
    """Roll up the usage samples of every allocation due (see the module), oldest release first;
    returns what was done: allocations and samples rolled up, hours written, and allocations
    skipped because their usage is not rated yet (the rating sweep will; they are tried again
    on the next run)."""
    now, budget = now or timezone.now(), budget or Budget(None)
    due = Allocation.objects.filter(usage_rolled_up_at__isnull=True, released_at__lt=rollup_cutoff(now))
    done = {"allocations": 0, "samples": 0, "hours": 0, "unrated": 0}
    page = due
    while budget.left():
        ids = list(page.order_by("released_at", "pk").values_list("released_at", "pk")[:ALLOCATIONS_PER_BATCH])
        if not ids:
            break
        # Keyset: an unrated allocation is passed over, not read again by this run.
        page = due.filter(Q(released_at__gt=ids[-1][0]) | Q(released_at=ids[-1][0], pk__gt=ids[-1][1]))
        for key, count in _roll_up(allocation_ids=[pk for _, pk in ids], now=now).items():
            done[key] += count
    RETENTION_ROWS.labels(table=UsageSample._meta.db_table, action="rolled_up").inc(done["samples"])
    if done["unrated"]:
        log.warning("usage roll-up: %d allocation(s) past the dispute window are not wholly rated", done["unrated"])
    return done


@transaction.atomic
def _roll_up(*, allocation_ids: list, now: datetime) -> dict:
    # Locked in key order, as rating locks them, so a posting for one of them cannot slip in
    # between the check that its usage is rated and the marking.
    locked = Allocation.objects.select_for_update(of=("self",)).filter(pk__in=allocation_ids, usage_rolled_up_at=None)
    ids = list(locked.order_by("pk").values_list("pk", flat=True))
    rated, unrated = [], 0
    rows = allocations_with_usage(Allocation.objects.filter(pk__in=ids)).values_list(
        "pk", "price_per_gpu_hour_micros", "usage_gpu_ms", "usage_wallet_micros"
    )
    for pk, price, used_ms, wallet_micros in rows:
        if usage_cost_micros(gpu_ms=used_ms, price_per_gpu_hour_micros=price) + wallet_micros > 0:
            unrated += 1
        else:
            rated.append(pk)
    hours = [
        UsageHour(
            allocation_id=row["allocation_id"], hour=row["hour"], samples=row["n"], gpu_ms=row["total_ms"],
            billable_gpu_ms=row["billable_ms"], first_seq=row["first"], last_seq=row["last"],
            first_recorded_at=row["earliest"], last_recorded_at=row["latest"],
        )
        for row in _hours(rated)
    ]  # fmt: skip
    UsageHour.objects.bulk_create(hours)
    Allocation.objects.filter(pk__in=rated).update(usage_rolled_up_at=now)
    samples = sum(hour.samples for hour in hours)
    return {"allocations": len(rated), "samples": samples, "hours": len(hours), "unrated": unrated}


def _hours(allocation_ids: list):
    """Per allocation and UTC hour of recording: the sums UsageHour keeps."""
    return (
        UsageSample.objects.filter(allocation_id__in=allocation_ids)
        .order_by()
        .values("allocation_id", hour=TruncHour("recorded_at", tzinfo=UTC))
        .annotate(
            n=Count("id"),
            total_ms=Sum("gpu_ms"),
            billable_ms=Coalesce(Sum("gpu_ms", filter=BILLABLE), 0),
            first=Min("seq"),
            last=Max("seq"),
            earliest=Min("recorded_at"),
            latest=Max("recorded_at"),
        )
    )


def usage_samples_prune(*, budget: Budget | None = None) -> int:
    """Delete rolled-up allocations' samples, RETENTION_BATCH a transaction; returns how many.
    On partitioned PostgreSQL only the default partition's: the week partitions are dropped
    whole (``usage_partitions_maintain``)."""
    budget = budget or Budget(None)
    table = partitions.DEFAULT if _partitioned() else UsageSample._meta.db_table
    # The oldest rows first: rolled-up allocations' samples are the table's oldest.
    sql = (
        f"DELETE FROM {table} WHERE id IN (SELECT s.id FROM {table} s JOIN {Allocation._meta.db_table} a "  # noqa: S608
        "ON a.id = s.allocation_id WHERE a.usage_rolled_up_at IS NOT NULL ORDER BY s.id LIMIT %s)"
    )
    deleted = 0
    while budget.left():
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, [settings.RETENTION_BATCH])
            count = cursor.rowcount
        deleted += count
        RETENTION_ROWS.labels(table=UsageSample._meta.db_table, action="pruned").inc(count)
        if count < settings.RETENTION_BATCH:
            break
    return deleted


def _partitioned() -> bool:
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        return partitions.is_partitioned(cursor)


def partition_drop_before(now: datetime) -> datetime:
    """A week partition ending before this holds allocations that all ended (they last at most
    JOB_MAX_DURATION_S) and were rolled up, if the roll-up kept up."""
    return rollup_cutoff(now) - timedelta(seconds=settings.JOB_MAX_DURATION_S)


def usage_partitions_maintain(*, now: datetime | None = None) -> dict:
    """PostgreSQL: make the week partitions up to USAGE_PARTITIONS_AHEAD_WEEKS ahead, and drop
    those whose allocations are all rolled up and past ``partition_drop_before``. A partition
    with an allocation not rolled up (unrated, or not ended: a bug) stays and is logged."""
    now = now or timezone.now()
    result = {"created": [], "dropped": [], "kept": []}
    if not _partitioned():
        return result
    first = partitions.week_start(now)
    for week in range(settings.USAGE_PARTITIONS_AHEAD_WEEKS + 1):
        with transaction.atomic(), connection.cursor() as cursor:
            if partitions.partition_create(cursor, first + week * partitions.WEEK):
                result["created"].append(partitions.partition_name(first + week * partitions.WEEK))
    with connection.cursor() as cursor:
        names = partitions.partitions(cursor)
    for name in names:
        start = partitions.partition_start(name)
        if start + partitions.WEEK > partition_drop_before(now):
            break
        pending = Allocation.objects.filter(
            usage_rolled_up_at__isnull=True, created_at__gte=start, created_at__lt=start + partitions.WEEK
        )
        if pending.exists():
            log.error("usage partition %s kept: %d allocation(s) in it are not rolled up", name, pending.count())
            result["kept"].append(name)
            continue
        with transaction.atomic(), connection.cursor() as cursor:
            # An estimate (the planner's): counting a week's rows would read them all.
            cursor.execute("SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE relname = %s", [name])
            rows = cursor.fetchone()[0]
            partitions.partition_drop(cursor, name)
        RETENTION_ROWS.labels(table=UsageSample._meta.db_table, action="pruned").inc(rows)
        result["dropped"].append(name)
    return result


def log_chunks_prune(*, now: datetime | None = None, budget: Budget | None = None) -> int:
    """Delete the log chunks of allocations released more than RETENTION_LOG_DAYS ago,
    RETENTION_BATCH a transaction; returns how many went."""
    now, budget = now or timezone.now(), budget or Budget(None)
    old = LogChunk.objects.filter(allocation__released_at__lt=now - timedelta(days=settings.RETENTION_LOG_DAYS))
    return rows_prune(old, budget)
