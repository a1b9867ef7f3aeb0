"""Placement matches a queued job to free slices on one unit and leases them, or says why not."""

from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.jobs.models import Allocation, Job, Lease
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import allocation_finish, job_cancel
from marketplace.kernel.models import AuditEvent
from nodes.models import GPU, Slice, Unit
from nodes.services import GpuReport, unit_heartbeat
from tests.conftest import gpus_make, job_make, unit_online

PRICE = 2_000_000


def shed(owner, name: str, **kwargs) -> Unit:
    unit, _ = unit_online(owner, name=name, **kwargs)
    return unit


def pending(job) -> dict:
    job.refresh_from_db()
    assert job.state == Job.State.QUEUED
    return job.pending_reason


def active_leases(unit: Unit) -> int:
    return Lease.objects.filter(slice__unit=unit, released_at__isnull=True).count()


class TestMatching:
    def test_a_job_is_placed_on_a_matching_unit(self, owner, renter):
        unit = shed(owner, "shed", gpus=2)
        job = job_make(renter)

        allocation = job_place(job_id=job.pk)

        assert allocation is not None
        assert allocation.unit == unit
        assert allocation.gpu_count == 1
        assert allocation.price_per_gpu_hour_micros == PRICE
        job.refresh_from_db()
        assert job.state == Job.State.PLACED
        assert job.attempts == 1
        assert job.placed_at is not None
        assert job.pending_reason == {}
        assert active_leases(unit) == 1
        placed = AuditEvent.objects.get(action="job.placed", subject_id=job.pk)
        assert placed.data["unit"] == str(unit.pk)
        assert placed.data["country"] == "DE"

    def test_a_job_stays_queued_where_no_unit_is_online(self, renter):
        job = job_make(renter)

        assert job_place(job_id=job.pk) is None

        assert pending(job) == {"units_considered": 0, "rejected": {}}

    def test_a_job_outside_its_jurisdictions_is_not_placed(self, owner, renter):
        shed(owner, "de", country="DE")
        job = job_make(renter, jurisdictions=["FR"])

        assert job_place(job_id=job.pk) is None

        assert pending(job) == {"units_considered": 1, "rejected": {"jurisdiction": 1}}

    def test_a_job_goes_to_a_unit_in_an_allowed_country(self, owner, renter):
        shed(owner, "de", country="DE", price_per_gpu_hour_micros=1_000_000)
        france = shed(owner, "fr", country="FR", price_per_gpu_hour_micros=9_000_000)

        allocation = job_place(job_id=job_make(renter, jurisdictions=["FR", "IT"]).pk)

        assert allocation.unit == france

    def test_a_unit_above_the_price_cap_is_not_used(self, owner, renter):
        shed(owner, "dear", price_per_gpu_hour_micros=3_000_000)
        job = job_make(renter, max_price_per_gpu_hour_micros=2_999_999)

        assert job_place(job_id=job.pk) is None

        assert pending(job) == {"units_considered": 1, "rejected": {"price_cap": 1}}

    def test_a_unit_exactly_at_the_price_cap_is_used(self, owner, renter):
        shed(owner, "fair", price_per_gpu_hour_micros=3_000_000)

        allocation = job_place(job_id=job_make(renter, max_price_per_gpu_hour_micros=3_000_000).pk)

        assert allocation.price_per_gpu_hour_micros == 3_000_000

    def test_gpu_models_must_match(self, owner, renter):
        shed(owner, "hopper", gpus=2)
        job = job_make(renter, gpu_models=["A100"])

        assert job_place(job_id=job.pk) is None

        assert pending(job) == {"units_considered": 1, "rejected": {"gpu_model": 1}}
        assert job_place(job_id=job_make(renter, gpu_models=["A100", "H100"]).pk) is not None

    def test_too_little_vram_is_not_used(self, owner, renter):
        shed(owner, "eighty", gpus=1)  # 81,920 MB, exactly 80 GB
        job = job_make(renter, min_vram_gb=81)

        assert job_place(job_id=job.pk) is None

        assert pending(job) == {"units_considered": 1, "rejected": {"vram": 1}}
        assert job_place(job_id=job_make(renter, min_vram_gb=80).pk) is not None

    def test_a_unit_that_does_not_offer_the_isolation_is_not_used(self, owner, renter):
        shed(owner, "timeshare", isolation_levels=["shared"])
        job = job_make(renter, isolation="gpu")

        assert job_place(job_id=job.pk) is None

        assert pending(job) == {"units_considered": 1, "rejected": {"isolation": 1}}

    def test_a_weaker_isolation_is_served_by_a_stronger_one(self, owner, renter):
        shed(owner, "exclusive", isolation_levels=["gpu"])

        assert job_place(job_id=job_make(renter, isolation="shared").pk) is not None


class TestNodeIsolation:
    def test_a_node_job_takes_every_gpu_of_the_unit(self, owner, renter):
        unit = shed(owner, "whole", gpus=4)

        allocation = job_place(job_id=job_make(renter, isolation="node", gpu_count=1).pk)

        assert allocation.unit == unit
        assert allocation.gpu_count == 4
        assert active_leases(unit) == 4

    def test_a_node_job_needs_node_in_the_units_isolation_levels(self, owner, renter):
        shed(owner, "gpus-only", isolation_levels=["gpu"])
        job = job_make(renter, isolation="node")

        assert job_place(job_id=job.pk) is None

        assert pending(job)["rejected"] == {"isolation": 1}

    def test_a_node_job_does_not_share_a_unit(self, owner, renter):
        unit = shed(owner, "shared", gpus=4)
        job_place(job_id=job_make(renter).pk)
        job = job_make(renter, isolation="node")

        assert job_place(job_id=job.pk) is None

        assert pending(job)["rejected"] == {"unit_busy": 1}
        assert active_leases(unit) == 1

    def test_nothing_else_lands_on_a_unit_held_by_a_node_job(self, owner, renter):
        unit, credential = unit_online(owner, name="held", gpus=4)
        sick = [GpuReport(**{**vars(gpu), "healthy": gpu.index != 3}) for gpu in gpus_make(4, prefix="GPU-held")]
        unit_heartbeat(unit=unit, gpus=sick)
        assert job_place(job_id=job_make(renter, isolation="node").pk).gpu_count == 3
        unit_heartbeat(unit=unit, gpus=gpus_make(4, prefix="GPU-held"))  # GPU 3 has recovered
        job = job_make(renter)

        assert job_place(job_id=job.pk) is None

        assert pending(job)["rejected"] == {"unit_busy": 1}
        assert active_leases(unit) == 3

    def test_a_node_job_does_not_take_a_unit_with_gpus_it_cannot_use(self, owner, renter):
        unit, _ = unit_online(owner, name="mixed", gpus=0)
        mixed = [
            GpuReport(index=i, uuid=f"GPU-mixed-{i}", model="H100" if i < 2 else "A100", vram_mb=81920)
            for i in range(4)
        ]
        unit_heartbeat(unit=unit, gpus=mixed)
        job = job_make(renter, isolation="node", gpu_models=["H100"])

        assert job_place(job_id=job.pk) is None

        assert pending(job)["rejected"] == {"gpu_model": 1}
        assert active_leases(unit) == 0


class TestGangAllocation:
    def test_all_gpus_of_a_job_land_on_one_unit(self, owner, renter):
        shed(owner, "small", gpus=2)
        big = shed(owner, "big", gpus=4)

        allocation = job_place(job_id=job_make(renter, gpu_count=3).pk)

        assert allocation.unit == big
        assert allocation.gpu_count == 3
        assert set(Lease.objects.filter(allocation=allocation).values_list("slice__unit", flat=True)) == {big.pk}

    def test_a_job_too_big_for_any_one_unit_stays_queued(self, owner, renter):
        first, second = shed(owner, "one", gpus=2), shed(owner, "two", gpus=2)
        job = job_make(renter, gpu_count=3)

        assert job_place(job_id=job.pk) is None

        assert pending(job) == {"units_considered": 2, "rejected": {"capacity": 2}}
        assert active_leases(first) == active_leases(second) == 0
        assert not Allocation.objects.exists()

    def test_a_unit_partly_used_is_not_enough_for_a_big_job(self, owner, renter):
        unit = shed(owner, "four", gpus=4)
        job_place(job_id=job_make(renter, gpu_count=2).pk)
        job = job_make(renter, gpu_count=3)

        assert job_place(job_id=job.pk) is None

        assert pending(job)["rejected"] == {"capacity": 1}
        assert active_leases(unit) == 2


class TestRanking:
    def test_the_cheapest_unit_is_chosen_first(self, owner, renter):
        shed(owner, "dear", price_per_gpu_hour_micros=3_000_000)
        cheap = shed(owner, "cheap", price_per_gpu_hour_micros=1_500_000)
        shed(owner, "middle", price_per_gpu_hour_micros=2_000_000)

        allocation = job_place(job_id=job_make(renter).pk)

        assert allocation.unit == cheap
        assert allocation.price_per_gpu_hour_micros == 1_500_000

    def test_among_equal_prices_the_fuller_unit_is_chosen(self, owner, renter):
        shed(owner, "roomy", gpus=4)
        snug = shed(owner, "snug", gpus=2)

        assert job_place(job_id=job_make(renter).pk).unit == snug

    def test_the_price_is_locked_at_placement(self, owner, renter):
        unit = shed(owner, "shed")
        allocation = job_place(job_id=job_make(renter).pk)

        Unit.objects.filter(pk=unit.pk).update(price_per_gpu_hour_micros=9_000_000)

        assert Allocation.objects.get(pk=allocation.pk).price_per_gpu_hour_micros == PRICE


class TestWhyPending:
    def test_reasons_are_counted_over_all_online_units(self, owner, renter):
        shed(owner, "paris", country="FR")
        shed(owner, "lyon", country="FR")
        shed(owner, "berlin", country="DE", price_per_gpu_hour_micros=5_000_000)
        job = job_make(renter, jurisdictions=["DE"], max_price_per_gpu_hour_micros=4_000_000)

        assert job_place(job_id=job.pk) is None

        assert pending(job) == {"units_considered": 3, "rejected": {"jurisdiction": 2, "price_cap": 1}}

    def test_the_reason_is_cleared_once_placed(self, owner, renter):
        job = job_make(renter)
        job_place(job_id=job.pk)
        assert pending(job)["units_considered"] == 0
        shed(owner, "late")

        job_place(job_id=job.pk)

        job.refresh_from_db()
        assert job.state == Job.State.PLACED
        assert job.pending_reason == {}


class TestUnitHealth:
    @pytest.mark.parametrize(
        ("status", "reason"),
        [
            (Unit.Status.SUSPECT, "unit_offline"),
            (Unit.Status.OFFLINE, "unit_offline"),
            (Unit.Status.DRAINING, "unit_draining"),
        ],
    )
    def test_a_unit_that_is_not_online_is_not_used_and_says_why(self, owner, renter, status, reason):
        unit = shed(owner, "sick")
        Unit.objects.filter(pk=unit.pk).update(status=status)
        job = job_make(renter)

        assert job_place(job_id=job.pk) is None

        assert pending(job) == {"units_considered": 1, "rejected": {reason: 1}}

    def test_a_unit_with_a_stale_heartbeat_is_not_used(self, owner, renter):
        unit = shed(owner, "quiet")
        Unit.objects.filter(pk=unit.pk).update(last_heartbeat_at=timezone.now() - timedelta(seconds=20))
        job = job_make(renter)

        assert job_place(job_id=job.pk) is None

        assert pending(job)["units_considered"] == 1
        assert active_leases(unit) == 0

    def test_an_unhealthy_or_missing_gpu_is_not_used(self, owner, renter):
        unit = shed(owner, "shed", gpus=2)
        GPU.objects.filter(unit=unit, index=0).update(healthy=False)
        GPU.objects.filter(unit=unit, index=1).update(present=False)
        job = job_make(renter)

        assert job_place(job_id=job.pk) is None

        assert pending(job)["rejected"] == {"capacity": 1}


class TestLifecycle:
    def test_finished_slices_are_free_again(self, owner, renter):
        unit = shed(owner, "shed", gpus=2)
        first = job_place(job_id=job_make(renter, gpu_count=2).pk)
        second = job_make(renter, gpu_count=2)
        assert job_place(job_id=second.pk) is None

        allocation_finish(allocation=first, exit_code=0, reason="")

        assert job_place(job_id=second.pk).unit == unit
        assert active_leases(unit) == 2

    def test_a_job_is_placed_only_once(self, owner, renter):
        shed(owner, "shed", gpus=4)
        job = job_make(renter)
        job_place(job_id=job.pk)

        assert job_place(job_id=job.pk) is None

        assert Allocation.objects.filter(job=job).count() == 1
        assert Job.objects.get(pk=job.pk).attempts == 1

    def test_a_cancelled_job_is_not_placed(self, owner, renter):
        unit = shed(owner, "shed")
        job = job_make(renter)
        job_cancel(job=job, actor="test")

        assert job_place(job_id=job.pk) is None

        assert active_leases(unit) == 0


class TestDatabaseGuarantees:
    """The constraints hold even when the services are bypassed."""

    def allocation(self, renter, unit) -> Allocation:
        job = Job.objects.create(renter=renter, image="x", command=["y"], state=Job.State.PLACED)
        return Allocation.objects.create(job=job, unit=unit, price_per_gpu_hour_micros=PRICE, gpu_count=1)

    def test_a_slice_cannot_have_two_active_leases(self, owner, renter):
        unit = shed(owner, "shed", gpus=1)
        slice_ = Slice.objects.get(unit=unit)
        Lease.objects.create(allocation=self.allocation(renter, unit), slice=slice_)

        with pytest.raises(IntegrityError), transaction.atomic():
            Lease.objects.create(allocation=self.allocation(renter, unit), slice=slice_)

        assert Lease.objects.filter(slice=slice_).count() == 1

    def test_a_released_lease_does_not_block_the_slice(self, owner, renter):
        unit = shed(owner, "shed", gpus=1)
        slice_ = Slice.objects.get(unit=unit)
        Lease.objects.create(allocation=self.allocation(renter, unit), slice=slice_, released_at=timezone.now())

        Lease.objects.create(allocation=self.allocation(renter, unit), slice=slice_)

        assert Lease.objects.filter(slice=slice_, released_at__isnull=True).count() == 1

    def test_a_job_cannot_have_two_active_allocations(self, owner, renter):
        unit = shed(owner, "shed", gpus=1)
        job = self.allocation(renter, unit).job

        with pytest.raises(IntegrityError), transaction.atomic():
            Allocation.objects.create(job=job, unit=unit, price_per_gpu_hour_micros=PRICE, gpu_count=1)
