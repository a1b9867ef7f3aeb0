"""Retention benchmark: the retention tasks over a large synthetic history, on a scratch PostgreSQL database.

``--allocations`` one-GPU allocations start evenly over the last ``--days`` days, each running up
to two days (those still running are not released) and reporting ``--samples`` usage samples in
all, every allocation's usage rated into the ledger except every ``--unrated-every``-th one's.
Beside them: ``--audit`` audit events, ``--outbox`` Stripe outbox rows (a tenth pending, a tenth
meter events), ``--webhooks`` webhook events (processed) and ``--logs`` log chunks of 1 KB, all
spread over the same days. The week partitions of the history are made first, as the migration
makes them for existing data.

The usage dispute window is the configured one; the other tables are kept ``--keep-days`` (so
that part of each is due). Prints row counts and on-disk sizes (``pg_total_relation_size``, all
partitions together) before and after, each step's duration, and what it did.
"""

import tempfile
import time
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from marketplace.devtools.bench.placement import scratch_database

HELP = "Retention tasks over a synthetic history: rows and on-disk sizes before and after, and durations."
TABLES = {
    "usage_samples": "jobs_usagesample",
    "usage_hours": "jobs_usagehour",
    "log_chunks": "jobs_logchunk",
    "audit_events": "kernel_auditevent",
    "outbox_messages": "billing_outboxmessage",
    "webhook_events": "billing_webhookevent",
    "ledger_entries": "billing_ledgerentry",
}


OPTIONS = ("samples", "allocations", "days", "unrated_every", "audit", "outbox", "webhooks", "logs", "keep_days")


def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=int, default=2_000_000, help="usage samples in all")
    parser.add_argument("--allocations", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=100, help="days of history")
    parser.add_argument("--unrated-every", type=int, default=1000, help="every Nth allocation's usage is left unrated")
    parser.add_argument("--audit", type=int, default=500_000)
    parser.add_argument("--outbox", type=int, default=100_000)
    parser.add_argument("--webhooks", type=int, default=100_000)
    parser.add_argument("--logs", type=int, default=100_000, help="log chunks of 1 KB")
    parser.add_argument("--keep-days", type=int, default=30, help="retention of audit, outbox, webhook and log rows")
    parser.add_argument("--keep-database", action="store_true", help="leave the scratch database for inspection")


def run(**options) -> dict:
    if connection.vendor != "postgresql":
        raise CommandError("bench retention needs PostgreSQL: set DATABASE_URL to a PostgreSQL server.")
    if min(options["samples"], options["allocations"], options["days"], options["unrated_every"]) < 1:
        raise CommandError("--samples, --allocations, --days and --unrated-every must be at least 1.")
    keep = options["keep_days"]
    with (
        scratch_database(keep=options["keep_database"]),
        tempfile.TemporaryDirectory() as archive,
        override_settings(
            RETENTION_LOG_DAYS=keep,
            RETENTION_AUDIT_DAYS=keep,
            RETENTION_OUTBOX_DAYS=keep,
            RETENTION_WEBHOOK_DAYS=max(keep, settings.RETENTION_WEBHOOK_MIN_DAYS),
            RETENTION_ARCHIVE_DIR=archive,
        ),  # fmt: skip
    ):
        now = timezone.now()
        started = time.perf_counter()
        history(options, now=now)
        built_s = time.perf_counter() - started
        _analyze()
        before = sizes()
        steps = retention_run(now=now)
        _analyze()
        return {
            "options": {name: options[name] for name in OPTIONS},
            "dispute_window_days": settings.USAGE_DISPUTE_WINDOW_DAYS,
            "history_built_s": round(built_s, 1),
            "before": before,
            "steps": steps,
            "after": sizes(),
        }


def history(options: dict, *, now) -> None:
    from marketplace.jobs import partitions

    days = options["days"]
    start = now - timedelta(days=days)
    with transaction.atomic(), connection.cursor() as cursor:
        week = partitions.week_start(start)
        while week <= now:
            partitions.partition_create(cursor, week)
            week += partitions.WEEK
    renter, owner = _people()
    allocation_ids = _allocations(options, owner=owner, renter=renter, start=start, now=now)
    _samples(options)
    _rate(allocation_ids, options["unrated_every"])
    _others(options, renter=renter, start=start, now=now)


def _people():
    from billing.services import wallet_credit_promotional
    from nodes.models import Unit

    User = get_user_model()
    owner = User.objects.create(username="bench-owner")
    renter = User.objects.create(username="bench-renter")
    Unit.objects.create(owner=owner, name="shed", country="DE", status=Unit.Status.ONLINE)
    wallet_credit_promotional(user=renter, amount_micros=10**15, key="bench:credit")
    return renter, owner


def _allocations(options: dict, *, owner, renter, start, now) -> list:
    """Allocations starting evenly over the span, each running up to two days (released then,
    unless that is still to come)."""
    from marketplace.jobs.models import Allocation, Job
    from nodes.models import Unit

    unit = Unit.objects.get(owner=owner)
    count, span = options["allocations"], now - start
    jobs, allocations = [], []
    for n in range(count):
        job = Job(renter=renter, state=Job.State.SUCCEEDED, image="ghcr.io/acme/train:1", command=["train"])
        begin = start + span * n / count
        end = begin + timedelta(hours=6 + (n * 7) % 42)
        released = end if end < now else None
        jobs.append(job)
        allocations.append(
            Allocation(
                job=job,
                unit=unit,
                price_per_gpu_hour_micros=2_000_000,
                gpu_count=1,
                created_at=begin,
                released_at=released,
            )  # fmt: skip
        )
    Job.objects.bulk_create(jobs)
    Allocation.objects.bulk_create(allocations)
    return [allocation.pk for allocation in allocations]


def _samples(options: dict) -> None:
    """Each allocation's share of the samples, evenly over its life (to now, if still running),
    written by PostgreSQL itself: a generate_series per allocation, in one statement."""
    per = max(1, options["samples"] // options["allocations"])
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO jobs_usagesample (allocation_id, seq, gpu_ms, recorded_at, received_at, allocation_started_at)
            SELECT a.id, g, span_ms / %(per)s, a.created_at + (g * span_ms / %(per)s) * interval '1 millisecond',
                   a.created_at + (g * span_ms / %(per)s + 5000) * interval '1 millisecond', a.created_at
            FROM (SELECT id, created_at,
                         (EXTRACT(EPOCH FROM COALESCE(released_at, now()) - created_at) * 1000)::bigint AS span_ms
                  FROM jobs_allocation) a,
                 generate_series(1, %(per)s) g
            """,
            {"per": per},
        )


def _rate(allocation_ids: list, unrated_every: int) -> None:
    from billing.services import usage_rate

    rated = [pk for n, pk in enumerate(allocation_ids) if n % unrated_every]
    for first in range(0, len(rated), 500):
        usage_rate(rated[first : first + 500])


def _others(options: dict, *, renter, start, now) -> None:
    """Audit events, outbox rows, webhook events and log chunks spread evenly over the span."""
    span_s = int((now - start).total_seconds())
    _stripe_rows(options, renter=renter, start=start, span_s=span_s)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO kernel_auditevent (action, subject_id, actor, data, created_at) "
            "SELECT 'job.placed', gen_random_uuid(), 'bench', jsonb_build_object('n', g), "
            "%s + (g::bigint * %s / %s) * interval '1 second' FROM generate_series(1, %s) g",
            [start, span_s, max(options["audit"], 1), options["audit"]],
        )
        cursor.execute(
            'INSERT INTO jobs_logchunk (allocation_id, "offset", data, received_at) '
            "SELECT a.id, g * 1024, repeat('x', 1023) || chr(10), a.created_at FROM "
            "(SELECT id, created_at, row_number() OVER (ORDER BY created_at) AS n FROM jobs_allocation) a, "
            "generate_series(0, %s - 1) g",
            [max(1, options["logs"] // options["allocations"])],
        )


def _stripe_rows(options: dict, *, renter, start, span_s: int) -> None:
    """Outbox rows (every tenth pending, every tenth a meter event) and processed webhook events,
    through the models, so their defaults hold whatever columns the tables grow."""
    from billing.models import OutboxMessage, WebhookEvent

    def at(n: int, count: int):
        return start + timedelta(seconds=n * span_s // max(count, 1))

    count = options["outbox"]
    OutboxMessage.objects.bulk_create(
        (
            OutboxMessage(
                operation="billing.meter_events.create" if n % 10 == 1 else "customers.create",
                payload={"n": n}, user=renter, state="pending" if n % 10 == 0 else "sent", attempts=1,
                stripe_id=f"cus_{n}", created_at=at(n, count), next_attempt_at=at(n, count),
            )
            for n in range(count)
        ),
        batch_size=5000,
    )  # fmt: skip
    count = options["webhooks"]
    WebhookEvent.objects.bulk_create(
        (
            WebhookEvent(event_id=f"evt_{n}", type="charge.refunded", payload={}, received_at=at(n, count),
                         processed_at=at(n, count), attempts=1)
            for n in range(count)
        ),
        batch_size=5000,
    )  # fmt: skip


def _analyze() -> None:
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def sizes() -> dict:
    """Rows and bytes on disk (with indexes and TOAST, all partitions together) per table."""
    result = {}
    with connection.cursor() as cursor:
        for name, table in TABLES.items():
            cursor.execute(f"SELECT COUNT(*) FROM {table}")  # noqa: S608 - names are ours
            rows = cursor.fetchone()[0]
            # A partitioned table's own size is nothing: its partitions hold the rows.
            cursor.execute(
                "SELECT pg_total_relation_size(%s::regclass) + "
                "COALESCE((SELECT SUM(pg_total_relation_size(relid)) FROM pg_partition_tree(%s) WHERE isleaf), 0)",
                [table, table],
            )
            result[name] = {"rows": rows, "mb": round(int(cursor.fetchone()[0]) / 2**20, 1)}
        cursor.execute("SELECT COUNT(*) FROM pg_partition_tree('jobs_usagesample') WHERE isleaf")
        result["usage_partitions"] = cursor.fetchone()[0]
    return result


def retention_run(*, now) -> dict:
    """Each retention step as its task runs it, without the time budget, timed."""
    from billing import retention as billing_retention
    from marketplace.jobs import retention as jobs_retention
    from marketplace.kernel import retention as kernel_retention

    steps = {
        "usage_roll_up": lambda: jobs_retention.usage_samples_roll_up(now=now),
        "usage_prune_default_partition": lambda: jobs_retention.usage_samples_prune(),
        "usage_partitions": lambda: jobs_retention.usage_partitions_maintain(now=now),
        "log_chunks": lambda: jobs_retention.log_chunks_prune(now=now),
        "audit_archive": lambda: kernel_retention.audit_events_archive(now=now),
        "outbox": lambda: billing_retention.outbox_messages_prune(now=now),
        "webhooks": lambda: billing_retention.webhook_events_prune(now=now),
    }
    result = {}
    for name, step in steps.items():
        started = time.perf_counter()
        done = step()
        result[name] = {"s": round(time.perf_counter() - started, 2), "did": done}
    archive = kernel_retention.archive_dir()
    files = list(archive.glob("*.jsonl.gz")) if archive.exists() else []
    result["audit_archive"]["files"] = len(files)
    result["audit_archive"]["mb"] = round(sum(path.stat().st_size for path in files) / 2**20, 1)
    return result
