"""Four workers racing over the same rows: no slice leased twice, no token or usage used twice.

Only PostgreSQL runs these: SQLite serialises every writer, so there would be no race to lose.
"""

import random
import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Count, Sum
from django.utils import timezone

from billing.models import LedgerEntry
from billing.services import usage_post
from marketplace.jobs.models import Allocation, Job, Lease, UsageSample
from marketplace.jobs.placement import job_place
from marketplace.jobs.selectors import allocation_usage
from marketplace.jobs.services import allocation_pull
from marketplace.jobs.usage import SampleReport, UsageRefused, usage_record
from marketplace.kernel.errors import TokenUsed
from marketplace.kernel.models import AuditEvent
from marketplace.kernel.money import usage_cost_micros
from marketplace.kernel.tokens import token_digest
from nodes.models import Slice
from nodes.services import unit_enrol, unit_register
from tests.conftest import JOB_SPEC, allocation_since, unit_online, user_make

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.pg,  # row locks and races need PostgreSQL
]

WORKERS = 4
UNITS, GPUS_PER_UNIT = 3, 4
SINGLE_JOBS, DOUBLE_JOBS = 40, 6


def jobs_make(renter) -> list:
    # Straight to the table: job_submit would also enqueue a placement task for each job.
    jobs = [Job(renter=renter, gpu_count=1, **JOB_SPEC) for _ in range(SINGLE_JOBS)]
    jobs += [Job(renter=renter, gpu_count=2, **JOB_SPEC) for _ in range(DOUBLE_JOBS)]
    random.Random(7).shuffle(jobs)
    Job.objects.bulk_create(jobs)
    return [job.pk for job in jobs]


def race(work, *, workers: int = WORKERS) -> tuple[list, list[BaseException]]:
    """Run work(i) in `workers` threads released together; return their results and errors."""
    barrier = threading.Barrier(workers)
    results: list = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results.append(work(i))
        except BaseException as error:  # reported to the test thread, which asserts on it
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a worker hung"
    return results, errors


def place_all(job_ids: list):
    """A placement worker's loop: every job, in an order of its own."""

    def work(seed: int) -> None:
        order = list(job_ids)
        random.Random(seed).shuffle(order)
        for job_id in order:
            job_place(job_id=job_id)

    return work


@pytest.mark.parametrize("round_", range(3))
def test_racing_workers_fill_capacity_without_double_booking(round_):
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    units = [unit_online(owner, name=f"shed-{i}", gpus=GPUS_PER_UNIT)[0] for i in range(UNITS)]
    job_ids = jobs_make(renter)

    _, errors = race(place_all(job_ids))

    assert errors == []
    active = Lease.objects.filter(released_at__isnull=True)
    doubled = active.values("slice").annotate(n=Count("id")).filter(n__gt=1)
    assert list(doubled) == [], "a slice is leased twice"
    assert active.count() == Slice.objects.count() == UNITS * GPUS_PER_UNIT, "capacity was left unused"

    placed = Job.objects.filter(state=Job.State.PLACED)
    allocations = Allocation.objects.filter(released_at__isnull=True).prefetch_related("leases__slice")
    assert Counter(a.job_id for a in allocations) == Counter({job.pk: 1 for job in placed}), "a job placed twice"
    for allocation in allocations:
        slices = [lease.slice for lease in allocation.leases.all()]
        assert len(slices) == allocation.gpu_count == allocation.job.gpu_count
        assert {s.unit_id for s in slices} == {allocation.unit_id}, "a gang split across units"
    assert {u.pk for u in units} == {a.unit_id for a in allocations}
    assert set(placed.values_list("attempts", flat=True)) == {1}
    assert AuditEvent.objects.filter(action="job.placed").count() == placed.count()

    rest = Job.objects.exclude(pk__in=placed.values("pk"))
    assert rest.count() == len(job_ids) - placed.count()
    assert set(rest.values_list("state", flat=True)) == {Job.State.QUEUED}
    assert not rest.filter(attempts__gt=0).exists()


def test_a_token_raced_by_four_agents_enrols_exactly_one():
    unit, token = unit_register(owner=user_make("olivia-owner"), name="shed", country="DE")

    credentials, errors = race(lambda i: unit_enrol(token=token, hostname=f"agent-{i}", agent_version="test")[1])

    assert len(credentials) == 1
    assert len(errors) == WORKERS - 1 and all(isinstance(error, TokenUsed) for error in errors), errors
    unit.refresh_from_db()
    assert unit.credential_digest == token_digest(credentials[0])


def test_an_allocation_pulled_by_four_requests_is_handed_out_once():
    unit, _ = unit_online(user_make("olivia-owner"), name="shed", gpus=1)
    job = Job.objects.create(renter=user_make("rita-renter"), **JOB_SPEC)
    allocation = job_place(job_id=job.pk)

    pulled, errors = race(lambda i: allocation_pull(unit=unit))

    assert errors == []
    assert [a.pk for a in pulled if a is not None] == [allocation.pk]
    assert Job.objects.get(pk=job.pk).state == Job.State.STARTING
    assert AuditEvent.objects.filter(action="allocation.acknowledged").count() == 1


def test_usage_reported_and_posted_concurrently_is_charged_once():
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    unit, _ = unit_online(owner, name="shed", gpus=1)
    allocation = job_place(job_id=Job.objects.create(renter=renter, **JOB_SPEC).pk)
    at = timezone.now()
    allocation_since(allocation, at - timedelta(hours=3))
    reports = [SampleReport(seq=seq, gpu_ms=1_000_000, recorded_at=at) for seq in range(1, 11)]

    def work(i: int):
        accepted, _ = usage_record(allocation=allocation, samples=reports)
        usage_post(allocation_id=allocation.pk)
        return accepted

    accepted, errors = race(work)

    assert errors == []
    assert sum(accepted) == 10
    assert UsageSample.objects.filter(allocation=allocation).count() == 10
    expected = usage_cost_micros(gpu_ms=10_000_000, price_per_gpu_hour_micros=allocation.price_per_gpu_hour_micros)
    assert allocation_usage(allocation) == (10_000_000, expected)
    assert LedgerEntry.objects.aggregate(total=Sum("amount_micros"))["total"] == 0


def test_concurrent_usage_batches_never_add_up_to_more_than_the_allocation_was_active(settings):
    """Each batch alone fits the allocation's GPU time, all four together do not: the row lock
    makes each batch count what the others stored, so only as many are taken as fit."""
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    unit_online(owner, name="shed", gpus=1)
    allocation = job_place(job_id=Job.objects.create(renter=renter, **JOB_SPEC).pk)
    now = timezone.now()
    # Active 100 s, with 30 s of tolerance: room for two samples of 60 s, not three.
    settings.USAGE_TOLERANCE_S = 30
    allocation_since(allocation, now - timedelta(seconds=100))

    def work(i: int):
        return usage_record(allocation=allocation, samples=[SampleReport(seq=i + 1, gpu_ms=60_000, recorded_at=now)])

    accepted, errors = race(work)

    assert accepted == [(1, 0), (1, 0)]
    assert len(errors) == 2 and all(isinstance(error, UsageRefused) for error in errors)
    assert UsageSample.objects.filter(allocation=allocation).aggregate(total=Sum("gpu_ms"))["total"] == 120_000
