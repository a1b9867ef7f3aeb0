"""The data invariants the chaos suite and the soak judge runs by: silent on a sound history,
and each one speaks up when its rule is broken."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from billing.models import LedgerEntry, LedgerTransaction
from billing.services import usage_post, wallet_credit_promotional
from marketplace.devtools import invariants
from marketplace.jobs.models import Allocation, Job, Lease, UsageSample
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import allocation_finish, allocation_pull, allocation_start
from marketplace.jobs.usage import SampleReport, usage_record
from tests.conftest import allocation_since, job_make, unit_online

pytestmark = pytest.mark.django_db


def found(**kwargs) -> dict[str, list[str]]:
    with connection.cursor() as cursor:
        result = invariants.check(cursor, now=timezone.now(), **kwargs)
    return {name: violations for name, violations in result.items() if violations}


@pytest.fixture
def finished(owner, renter):
    """A job run and finished on a one-GPU unit, with 60 s of usage charged."""
    wallet_credit_promotional(user=renter, amount_micros=50_000_000, key="invariants")
    unit, _ = unit_online(owner, gpus=1)
    job = job_make(renter)
    allocation = job_place(job_id=job.pk)
    allocation_since(allocation, timezone.now() - timedelta(seconds=120))
    assert allocation_pull(unit=unit) == allocation
    allocation_start(allocation=allocation)
    at = timezone.now() - timedelta(seconds=30)
    usage_record(allocation=allocation, samples=[SampleReport(seq=n, gpu_ms=20_000, recorded_at=at) for n in range(3)])
    allocation_finish(allocation=allocation, exit_code=0, reason="")
    usage_post(allocation_id=allocation.pk)
    allocation.refresh_from_db()
    return unit, job, allocation


def test_a_sound_history_breaks_no_invariant(finished):
    _, job, allocation = finished
    assert Job.objects.get(pk=job.pk).state == Job.State.SUCCEEDED
    assert LedgerTransaction.objects.filter(kind="usage", allocation=allocation).exists()

    assert found(job_ids=[job.pk]) == {}


def test_usage_not_charged_is_a_billing_and_a_wallet_fault_until_it_is_posted(finished):
    _, job, allocation = finished
    UsageSample.objects.create(
        allocation=allocation,
        allocation_started_at=allocation.created_at,
        seq=9,
        gpu_ms=30_000,
        recorded_at=allocation.released_at - timedelta(seconds=1),
    )

    assert set(found()) == {"billing", "wallet"}
    usage_post(allocation_id=allocation.pk)
    assert found() == {}


def test_usage_after_the_release_is_owed_by_nobody(finished):
    """A sample recorded after the release is not billable: charging it would be the fault."""
    _, _, allocation = finished
    UsageSample.objects.create(
        allocation=allocation,
        allocation_started_at=allocation.created_at,
        seq=9,
        gpu_ms=1_000,
        recorded_at=allocation.released_at + timedelta(seconds=5),
    )

    assert found() == {}


def test_a_leg_off_balance_is_caught(finished):
    _, _, allocation = finished
    txn = LedgerTransaction.objects.filter(kind="usage", allocation=allocation).first()
    wallet = txn.entries.order_by("amount_micros").first().account  # the renter's leg is the debit
    LedgerEntry.objects.create(transaction=txn, account=wallet, amount_micros=-1)

    assert set(found()) == {"unbalanced_transaction", "wallet", "billing"}


def test_a_slice_leased_to_two_allocations_at_once_is_caught_after_the_fact(finished, renter):
    unit, _, first = finished
    second_job = job_make(renter)
    second = job_place(job_id=second_job.pk)
    assert second is not None and second.unit_id == unit.pk
    # The first lease released only after the second began: the two overlapped.
    Lease.objects.filter(allocation=first).update(released_at=second.created_at + timedelta(seconds=1))

    assert list(found()) == ["double_lease"]


def test_usage_beyond_an_allocations_life_is_implausible(finished):
    _, _, allocation = finished
    life_ms = (allocation.released_at - allocation.created_at).total_seconds() * 1000
    UsageSample.objects.create(
        allocation=allocation,
        allocation_started_at=allocation.created_at,
        seq=9,
        gpu_ms=int(life_ms) + 10_000_000,
        recorded_at=allocation.created_at,
    )
    usage_post(allocation_id=allocation.pk)

    assert list(found()) == ["implausible_usage"]


def test_jobs_stranded_or_at_odds_with_their_allocations_are_caught(finished, renter):
    _, finished_job, allocation = finished
    waiting = job_make(renter)  # queued, and never told why
    Job.objects.filter(pk=waiting.pk).update(pending_reason={})
    running_bare = job_make(renter)
    Job.objects.filter(pk=running_bare.pk).update(state=Job.State.RUNNING)
    Allocation.objects.filter(pk=allocation.pk).update(released_at=None)  # a final job still holding it
    told_of = [finished_job.pk, waiting.pk, running_bare.pk, "00000000-0000-0000-0000-000000000001"]

    result = found(job_ids=told_of)

    assert len(result["stranded_job"]) == 3  # the queued one, the running one, the one never stored
    assert len(result["job_allocation_mismatch"]) == 2
    with_reason = job_make(renter)
    Job.objects.filter(pk=with_reason.pk).update(pending_reason={"code": "no_capacity"})
    assert not found(job_ids=[with_reason.pk]).get("stranded_job")
