"""A unit's reliability: the smoothed share of recent allocations it did not lose."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.services import unit_jobs_lost
from marketplace.jobs.units import unit_reliability_update
from nodes.models import Unit
from nodes.services import unit_register


@pytest.fixture
def unit(owner):
    unit, _ = unit_register(owner=owner, name="shed", country="DE")
    return unit


def allocation_make(unit, renter, *, reason: str | None, days_ago: float = 1) -> Allocation:
    job = Job.objects.create(renter=renter, image="ghcr.io/acme/train:1.0", command=["true"])
    released = None if reason is None else timezone.now() - timedelta(days=days_ago)
    return Allocation.objects.create(
        job=job,
        unit=unit,
        price_per_gpu_hour_micros=1,
        gpu_count=1,
        released_at=released,
        release_reason=reason or "",
    )


def reliability_of(unit) -> float:
    return Unit.objects.get(pk=unit.pk).reliability


def test_a_unit_with_no_history_scores_one_half(unit):
    unit_reliability_update(unit.pk)

    assert reliability_of(unit) == 0.5


def test_jobs_ending_on_their_own_count_as_kept_and_lost_ones_as_failures(unit, renter):
    for reason in ("exited", "timeout", "cancelled", "start_failed"):
        allocation_make(unit, renter, reason=reason)
    for reason in ("unit_offline", "agent_lost", "not_acknowledged", "refused:residency", "refused:limits"):
        allocation_make(unit, renter, reason=reason)

    unit_reliability_update(unit.pk)

    assert reliability_of(unit) == pytest.approx((4 + 1) / (9 + 2))


def test_refusing_for_backyard_limits_lowers_the_score(unit, renter):
    """A unit answering every job with `refused:limits` must not look more reliable for it."""
    allocation_make(unit, renter, reason="exited")
    unit_reliability_update(unit.pk)
    before = reliability_of(unit)

    allocation_make(unit, renter, reason="refused:limits")
    unit_reliability_update(unit.pk)

    assert reliability_of(unit) < before


def test_a_refusal_the_jobs_image_caused_neither_lowers_nor_raises_the_score(unit, renter):
    """Else a renter could lower every unit's standing with images no owner allows."""
    allocation_make(unit, renter, reason="exited")
    allocation_make(unit, renter, reason="unit_offline")
    unit_reliability_update(unit.pk)
    before = reliability_of(unit)

    for _ in range(5):
        allocation_make(unit, renter, reason="refused:registry")
    unit_reliability_update(unit.pk)

    assert reliability_of(unit) == before == pytest.approx((1 + 1) / (2 + 2))


def test_a_stop_for_residency_counts_as_lost(unit, renter):
    allocation_make(unit, renter, reason="residency")

    unit_reliability_update(unit.pk)

    assert reliability_of(unit) == pytest.approx(1 / 3)


def test_only_allocations_released_in_the_last_30_days_count(unit, renter):
    allocation_make(unit, renter, reason="unit_offline", days_ago=31)
    allocation_make(unit, renter, reason=None)  # still running
    allocation_make(unit, renter, reason="exited", days_ago=29)

    unit_reliability_update(unit.pk)

    assert reliability_of(unit) == pytest.approx(2 / 3)


def test_other_units_history_does_not_count(unit, owner, renter):
    other, _ = unit_register(owner=owner, name="other shed", country="DE")
    allocation_make(other, renter, reason="unit_offline")

    unit_reliability_update(unit.pk)

    assert reliability_of(unit) == 0.5


def test_the_update_is_one_query_and_leaves_the_capacity_version_alone(unit, renter, django_assert_num_queries):
    allocation_make(unit, renter, reason="agent_lost")
    version = Unit.objects.get(pk=unit.pk).capacity_version

    with django_assert_num_queries(1):
        unit_reliability_update(unit.pk)

    refreshed = Unit.objects.get(pk=unit.pk)
    assert refreshed.reliability == pytest.approx(1 / 3)
    assert refreshed.capacity_version == version


def test_losing_a_job_when_the_unit_goes_offline_lowers_its_reliability(unit, renter):
    allocation_make(unit, renter, reason="exited")
    allocation_make(unit, renter, reason=None)

    unit_jobs_lost(unit=unit)

    assert reliability_of(unit) == pytest.approx(2 / 4)
