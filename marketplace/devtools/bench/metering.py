"""Metering benchmark: agents' usage samples rated into the ledger, on a scratch PostgreSQL database.

``--allocations`` running allocations of ``--renters`` renters (every ``--postpaid-every``-th one
postpaid) on ``--units`` units report ``--samples`` samples spread over ``--hours`` hours, in
batches of about ``--batch`` per call as the agent sends them: some batches sent twice (a lost
answer), some overlapping the one before, some arriving late. Every batch goes through
``usage_record``, in the order the samples arrive, and the rating sweep posts the usage that
arrived every USAGE_POSTING_INTERVAL_S of the simulated clock, as beat and the worker would; as
the simulated clock passes each hour, that hour's meter events are enqueued. ``expected_micros``
is computed here from the samples fed, not read back.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from unittest import mock

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.db import connection
from django.db.models import Sum
from django.utils import timezone

from marketplace.devtools.bench.placement import scratch_database

HELP = "Usage samples rated per second through usage_record and usage_post, and the Stripe calls they cause."
MS_PER_HOUR = 3_600_000
PRICES = [1_500_000, 2_000_000, 2_500_000, 3_000_000]
METER_GRACE = timedelta(minutes=5)  # the hourly task runs this long after the hour


def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=int, default=200_000, help="distinct usage samples fed")
    parser.add_argument("--renters", type=int, default=40)
    parser.add_argument("--postpaid-every", type=int, default=4, help="every Nth renter is postpaid")
    parser.add_argument("--units", type=int, default=100)
    parser.add_argument("--allocations", type=int, default=200)
    parser.add_argument("--hours", type=int, default=3, help="simulated hours the samples cover")
    parser.add_argument("--batch", type=int, default=50, help="mean samples per agent call (the agent sends <= 100)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep-database", action="store_true", help="leave the scratch database for inspection")


def run(**options) -> dict:
    if connection.vendor != "postgresql":
        raise CommandError("bench metering needs PostgreSQL: set DATABASE_URL to a PostgreSQL server.")
    if min(options["samples"], options["renters"], options["units"], options["allocations"], options["batch"]) < 1:
        raise CommandError("--samples, --renters, --units, --allocations and --batch must be at least 1.")
    rng = random.Random(options["seed"])
    start = (datetime.now(UTC) - timedelta(hours=options["hours"] + 1)).replace(minute=0, second=0, microsecond=0)
    with scratch_database(keep=options["keep_database"]):
        allocations, postpaid = populate(rng, options, start)
        fed = usage_make(rng, allocations, options, start)
        deliveries = schedule(rng, fed, options["batch"])
        result = feed(deliveries, start=start, hours=options["hours"])
        return {**result, **account(postpaid, fed, options)}


def populate(rng: random.Random, options: dict, start: datetime) -> tuple[list, set]:
    """Renters (some postpaid, with a Stripe customer), units and running allocations on them,
    active since ``start`` (so the usage fed for the span after it is plausible)."""
    from billing.models import BillingProfile
    from marketplace.jobs.models import Allocation, Job
    from nodes.models import Unit

    User = get_user_model()
    owner_count = max(1, options["units"] // 10)
    owners = User.objects.bulk_create([User(username=f"bench-owner-{n}") for n in range(owner_count)])
    renters = User.objects.bulk_create([User(username=f"bench-renter-{n}") for n in range(options["renters"])])
    postpaid = {renter.pk for n, renter in enumerate(renters) if n % options["postpaid_every"] == 0}
    BillingProfile.objects.bulk_create(
        [
            BillingProfile(user=renter, stripe_customer_id=f"cus_bench{renter.pk}", postpaid=renter.pk in postpaid)
            for renter in renters
        ]
    )
    units = Unit.objects.bulk_create(
        [
            Unit(owner=rng.choice(owners), name=f"shed-{n}", country="DE", status=Unit.Status.ONLINE)
            for n in range(options["units"])
        ]
    )
    jobs, allocations = [], []
    for _ in range(options["allocations"]):
        gpus = rng.choice([1, 1, 2, 4, 8])
        job = Job(
            renter=rng.choice(renters), state=Job.State.RUNNING, image="ghcr.io/acme/train:1", command=["train"],
            gpu_count=gpus,
        )  # fmt: skip
        jobs.append(job)
        allocations.append(
            Allocation(
                job=job,
                unit=rng.choice(units),
                price_per_gpu_hour_micros=rng.choice(PRICES),
                gpu_count=gpus,
                created_at=start,
            )  # fmt: skip
        )
    Job.objects.bulk_create(jobs)
    Allocation.objects.bulk_create(allocations)
    return allocations, postpaid


def usage_make(rng: random.Random, allocations: list, options: dict, start: datetime) -> dict:
    """Each allocation's samples (seq, gpu_ms, recorded_at), taken evenly from a start within the
    first quarter of the span to its end, the samples shared out as evenly as the count allows."""
    from marketplace.jobs.usage import SampleReport

    span_ms = options["hours"] * MS_PER_HOUR
    share, extra = divmod(options["samples"], len(allocations))
    fed = {}
    for n, allocation in enumerate(allocations):
        count = share + (n < extra)
        if not count:
            continue
        begin = rng.randrange(span_ms // 4)
        step = (span_ms - begin) // count
        fed[allocation] = [
            SampleReport(
                seq=seq + 1,
                gpu_ms=allocation.gpu_count * step * rng.randint(90, 100) // 100,
                recorded_at=start + timedelta(milliseconds=begin + (seq + 1) * step),
            )
            for seq in range(count)
        ]
    return fed


def schedule(rng: random.Random, fed: dict, batch: int) -> list[tuple[datetime, object, list]]:
    """The agent calls, in the order they arrive: (arrival, allocation, samples). A batch
    arrives when its last sample was taken; 5% are sent again later, 5% repeat the tail of the
    batch before, 10% arrive late, after later batches. An allocation's first batch is on time."""
    calls = []
    for allocation, samples in fed.items():
        cut, previous = 0, []
        while cut < len(samples):
            size = rng.randint(max(1, batch // 2), batch + batch // 2)
            chunk = samples[cut : cut + size]
            cut += size
            arrival = chunk[-1].recorded_at
            sent = list(chunk)
            if previous and rng.random() < 0.05:
                sent = previous[-rng.randint(1, min(5, len(previous))) :] + sent
            if previous and rng.random() < 0.10:
                arrival += timedelta(minutes=rng.uniform(1, 45))
            rng.shuffle(sent)
            calls.append((arrival, allocation, sent))
            if rng.random() < 0.05:
                calls.append((arrival + timedelta(minutes=rng.uniform(0.5, 30)), allocation, list(sent)))
            previous = chunk
    calls.sort(key=lambda call: call[0])
    return calls


def feed(calls: list, *, start: datetime, hours: int) -> dict:
    """Deliver the calls in arrival order; the posting requests each one makes are served right
    after it (this process plays the Celery worker), and each hour's meter events are enqueued
    once the simulated clock is METER_GRACE past its end, then the hours left at the end."""
    from billing.meters import meter_events_enqueue
    from marketplace.jobs import ports
    from marketplace.jobs.usage import usage_record

    interval = timedelta(seconds=max(settings.USAGE_POSTING_INTERVAL_S, 1))
    accepted = duplicates = 0
    next_hour = start
    next_sweep = start + interval
    meter_s = 0.0
    swept_from = timezone.now()
    # Postings are the rating sweep's here (the bench plays the worker), not one per report.
    with mock.patch.object(ports, "usage_due", lambda allocation_id: None):
        started = time.perf_counter()
        for arrival, allocation, samples in calls:
            while arrival >= next_sweep:  # the rating sweep's beat, on the simulated clock
                swept_from = _sweep(swept_from)
                next_sweep += interval
            while arrival >= next_hour + timedelta(hours=1) + METER_GRACE:
                began = time.perf_counter()
                meter_events_enqueue(hour_start=next_hour)
                meter_s += time.perf_counter() - began
                next_hour += timedelta(hours=1)
            new, repeated = usage_record(allocation=allocation, samples=samples)
            accepted += new
            duplicates += repeated
        _sweep(swept_from)  # the jobs end: their last usage posted
        seconds = time.perf_counter() - started - meter_s
    began = time.perf_counter()
    while next_hour < start + timedelta(hours=hours + 1):
        meter_events_enqueue(hour_start=next_hour)
        next_hour += timedelta(hours=1)
    meter_s += time.perf_counter() - began
    return {
        "samples": accepted,
        "samples_per_s": round(accepted / seconds),
        "seconds": round(seconds, 2),
        "calls": len(calls),
        "duplicates_ignored": duplicates,
        "meter_enqueue_s": round(meter_s, 2),
    }


def _sweep(since):
    """One run of the rating sweep over what arrived since the last one began; returns when
    this one began (its samples are stamped on the real clock)."""
    from billing import services

    began = timezone.now()
    services.usage_rate_since(since)
    return began


def account(postpaid: set, fed: dict, options: dict) -> dict:
    """Counts from the database beside what the samples fed should have cost."""
    from billing.meters import OPERATION
    from billing.models import Account, LedgerEntry, LedgerTransaction, OutboxMessage
    from marketplace.kernel.money import usage_cost_micros

    expected = expected_postpaid = 0
    for allocation, samples in fed.items():
        cost = usage_cost_micros(
            gpu_ms=sum(sample.gpu_ms for sample in samples),
            price_per_gpu_hour_micros=allocation.price_per_gpu_hour_micros,
        )
        expected += cost
        expected_postpaid += cost if allocation.job.renter_id in postpaid else 0
    charged = -(
        LedgerEntry.objects.filter(transaction__kind="usage", account__kind=Account.Kind.RENTER_WALLET).aggregate(
            total=Sum("amount_micros")
        )["total"]
        or 0
    )
    meters = OutboxMessage.objects.filter(operation=OPERATION)
    hours = {sample.recorded_at.replace(minute=0, second=0, microsecond=0) for s in fed.values() for sample in s}
    return {
        "ledger_postings": LedgerTransaction.objects.filter(kind="usage").count(),
        "ledger_sum": LedgerEntry.objects.aggregate(total=Sum("amount_micros"))["total"] or 0,
        "renters": options["renters"],
        "postpaid_renters": len(postpaid),
        "allocations": len(fed),
        "hours_covered": len(hours),
        "stripe_calls": OutboxMessage.objects.count(),
        "meter_events": meters.count(),
        "charged_micros": charged,
        "expected_micros": expected,
        "metered_micros": sum(int(row["payload"]["payload"]["value"]) for row in meters.values("payload")),
        "expected_metered_micros": expected_postpaid,
    }
