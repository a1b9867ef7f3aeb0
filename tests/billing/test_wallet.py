"""The wallet in real time: no job is placed without a minimum run paid for, and running jobs are
stopped, with their usage billed, before the wallet falls below its floor."""

from datetime import timedelta

import pytest
from django.utils import timezone

from billing.models import BillingProfile
from billing.selectors import wallet_balance_micros
from billing.services import wallet_credit_promotional
from billing.tasks import usage_post
from billing.wallet import STOP_MARGIN_S, WALLET_EXHAUSTED, wallet_guard
from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.pending import pending_summary
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import allocation_pull, allocation_start
from marketplace.jobs.usage import SampleReport, usage_record
from marketplace.kernel.money import run_cost_micros
from tests.conftest import allocation_since, job_make, unit_online

PRICE = 3_600_000  # per GPU-hour: 1,000 micros per GPU-second
TEN_MINUTES = 600 * 1000  # micros for ten minutes of one GPU at PRICE


@pytest.fixture(autouse=True)
def wallet_rules(settings):
    settings.WALLET_MIN_RUN_S = 600
    settings.WALLET_FLOOR_MICROS = 0


@pytest.fixture
def shed(owner):
    unit, _ = unit_online(owner, name="shed", gpus=4, price_per_gpu_hour_micros=PRICE)
    return unit


def credit(renter, micros: int, key: str = "credit") -> None:
    wallet_credit_promotional(user=renter, amount_micros=micros, key=key)


def started(job: Job) -> Allocation:
    allocation = job_place(job_id=job.pk)
    assert allocation is not None
    allocation_since(allocation, timezone.now() - timedelta(hours=1))  # the usage the tests record fits
    allocation_pull(unit=allocation.unit)
    allocation_start(allocation=allocation)
    return allocation


def test_run_cost_rounds_up_to_a_whole_micro():
    assert run_cost_micros(price_per_gpu_hour_micros=PRICE, gpus=2, seconds=600) == 2 * TEN_MINUTES
    assert run_cost_micros(price_per_gpu_hour_micros=1, gpus=1, seconds=1) == 1


class TestPlacementNeedsFunds:
    def test_an_empty_wallet_keeps_the_job_queued_and_says_why(self, shed, renter):
        job = job_make(renter)

        assert job_place(job_id=job.pk) is None

        job.refresh_from_db()
        assert job.state == Job.State.QUEUED
        assert job.pending_reason["wallet"] == {"needed_micros": TEN_MINUTES, "available_micros": 0, "run_s": 600}
        assert "the wallet does not cover a 10-minute run (0.600000 needed, 0.000000 available)" in pending_summary(
            job.pending_reason
        )

    def test_a_wallet_that_covers_a_minimum_run_places_the_job(self, shed, renter):
        credit(renter, TEN_MINUTES)

        assert job_place(job_id=job_make(renter).pk) is not None

    def test_what_runs_already_is_set_aside_first(self, shed, renter):
        credit(renter, TEN_MINUTES * 3 // 2)  # one job's minimum run, and half of another
        assert job_place(job_id=job_make(renter).pk) is not None

        second = job_make(renter)
        assert job_place(job_id=second.pk) is None
        second.refresh_from_db()
        assert second.pending_reason["wallet"]["available_micros"] == TEN_MINUTES // 2

    def test_a_gang_needs_a_minimum_run_of_every_gpu(self, shed, renter):
        credit(renter, TEN_MINUTES * 3)

        assert job_place(job_id=job_make(renter, gpu_count=4).pk) is None
        assert job_place(job_id=job_make(renter, gpu_count=3).pk) is not None

    def test_a_postpaid_renter_is_billed_afterwards(self, shed, renter):
        BillingProfile.objects.create(user=renter, postpaid=True)

        assert job_place(job_id=job_make(renter).pk) is not None

    def test_a_top_up_lets_the_waiting_job_run(self, shed, renter):
        job = job_make(renter)
        assert job_place(job_id=job.pk) is None

        credit(renter, TEN_MINUTES)

        assert job_place(job_id=job.pk) is not None


class TestRunningJobsStopBeforeTheFloor:
    def test_a_wallet_exhausted_mid_job_stops_it_and_bills_usage_to_the_stop(self, shed, renter):
        credit(renter, TEN_MINUTES + 30_000)
        allocation = started(job_make(renter))
        now = timezone.now()
        # 580 s of use: the 50,000 left no longer cover the 60 s it takes to stop the job.
        usage_record(allocation=allocation, samples=[SampleReport(seq=1, gpu_ms=580_000, recorded_at=now)])

        usage_post(str(allocation.pk))

        job = Job.objects.get(pk=allocation.job_id)
        assert job.state == Job.State.FAILED and job.failure_reason == WALLET_EXHAUSTED
        assert wallet_balance_micros(renter) == 50_000  # charged for the usage up to here, and no more
        allocation.refresh_from_db()
        assert allocation.released_at is None  # the agent stops it and reports; the GPUs are busy until then
        # The last samples, up to the stop, are billed when the agent reports them.
        usage_record(
            allocation=allocation, samples=[SampleReport(seq=2, gpu_ms=20_000, recorded_at=now + timedelta(seconds=20))]
        )
        usage_post(str(allocation.pk))
        assert wallet_balance_micros(renter) == 30_000  # still above the floor: the margin covered the stop

    def test_a_wallet_with_room_leaves_jobs_running(self, shed, renter):
        credit(renter, TEN_MINUTES * 2)
        allocation = started(job_make(renter))

        assert wallet_guard(renter_id=renter.pk) == []
        assert Job.objects.get(pk=allocation.job_id).state == Job.State.RUNNING

    def test_the_margin_is_enough_to_stop_every_running_job(self, shed, renter):
        credit(renter, TEN_MINUTES * 2)
        first, second = started(job_make(renter)), started(job_make(renter))
        # Two jobs burn 2,000 micros a second: stopping them needs STOP_MARGIN_S of both.
        need = 2 * run_cost_micros(price_per_gpu_hour_micros=PRICE, gpus=1, seconds=STOP_MARGIN_S)
        spent = wallet_balance_micros(renter) - need + 1
        usage_record(allocation=first, samples=[SampleReport(seq=1, gpu_ms=spent, recorded_at=timezone.now())])

        usage_post(str(first.pk))

        assert {Job.objects.get(pk=a.job_id).state for a in (first, second)} == {Job.State.FAILED}

    def test_a_job_not_yet_picked_up_is_released_at_once(self, shed, renter):
        credit(renter, TEN_MINUTES)
        allocation = job_place(job_id=job_make(renter).pk)
        credit(renter, -TEN_MINUTES + 1, key="spent")  # the wallet emptied elsewhere

        assert [job.pk for job in wallet_guard(renter_id=renter.pk)] == [allocation.job_id]

        allocation.refresh_from_db()
        assert allocation.released_at is not None and allocation.release_reason == "stopped"

    def test_postpaid_renters_are_never_stopped(self, shed, renter):
        BillingProfile.objects.create(user=renter, postpaid=True)
        allocation = started(job_make(renter))

        assert wallet_guard(renter_id=renter.pk) == []
        assert Job.objects.get(pk=allocation.job_id).state == Job.State.RUNNING
