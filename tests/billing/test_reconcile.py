"""Placements nobody picked up, and jobs an agent silently lost, do not hold GPUs forever."""

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from marketplace.jobs.models import Allocation, Job, Lease
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import allocation_pull, allocation_start, allocations_expire_unacknowledged
from tests.conftest import agent_client, gpus_make, job_make, unit_online

pytestmark = pytest.mark.django_db


@pytest.fixture
def shed(owner):
    return unit_online(owner, name="shed", gpus=2)


def placed(unit, renter, **spec) -> Allocation:
    allocation = job_place(job_id=job_make(renter, **spec).pk)
    assert allocation is not None and allocation.unit_id == unit.pk
    return allocation


def picked_up(unit, renter, *, ago_s: float, **spec) -> Allocation:
    allocation = placed(unit, renter, **spec)
    assert allocation_pull(unit=unit) == allocation
    allocation_start(allocation=allocation)
    Allocation.objects.filter(pk=allocation.pk).update(acknowledged_at=timezone.now() - timedelta(seconds=ago_s))
    return allocation


def heartbeat(credential: str, *, running: list) -> dict:
    body = {"gpus": [vars(g) for g in gpus_make(2, prefix="GPU-shed")], "running": [str(r) for r in running]}
    response = agent_client(credential).post("/api/agent/v1/heartbeat", body, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def state_of(allocation: Allocation) -> str:
    return Job.objects.get(pk=allocation.job_id).state


def active_leases(allocation: Allocation) -> int:
    return Lease.objects.filter(allocation=allocation, released_at__isnull=True).count()


class TestUnacknowledgedPlacements:
    def test_a_placement_nobody_pulls_in_time_is_released_and_the_job_queued_again(self, shed, renter):
        unit, _ = shed
        allocation = placed(unit, renter)
        later = timezone.now() + settings.ASSIGNMENT_ACK_TIMEOUT + timedelta(seconds=1)

        assert allocations_expire_unacknowledged(now=later) == 1

        assert state_of(allocation) == Job.State.QUEUED
        assert active_leases(allocation) == 0
        assert Allocation.objects.get(pk=allocation.pk).release_reason == "not_acknowledged"

    def test_a_recent_placement_is_left_alone(self, shed, renter):
        unit, _ = shed
        allocation = placed(unit, renter)

        assert allocations_expire_unacknowledged(now=timezone.now()) == 0

        assert state_of(allocation) == Job.State.PLACED
        assert active_leases(allocation) == 1

    def test_a_pulled_placement_never_expires(self, shed, renter):
        unit, _ = shed
        allocation = picked_up(unit, renter, ago_s=3600)
        later = timezone.now() + settings.ASSIGNMENT_ACK_TIMEOUT * 10

        assert allocations_expire_unacknowledged(now=later) == 0
        assert state_of(allocation) == Job.State.RUNNING


class TestHeartbeatReconciliation:
    def test_a_job_the_agent_still_reports_keeps_running(self, shed, renter):
        unit, credential = shed
        allocation = picked_up(unit, renter, ago_s=3600)

        heartbeat(credential, running=[allocation.pk])

        assert state_of(allocation) == Job.State.RUNNING
        assert active_leases(allocation) == 1

    def test_a_job_the_agent_forgot_is_lost_and_its_gpus_freed(self, shed, renter):
        unit, credential = shed
        allocation = picked_up(unit, renter, ago_s=settings.AGENT_LOST_GRACE.total_seconds() + 5)

        heartbeat(credential, running=[])

        job = Job.objects.get(pk=allocation.job_id)
        assert job.state == Job.State.LOST
        assert "no longer runs" in job.failure_reason
        assert active_leases(allocation) == 0

    def test_a_restartable_job_the_agent_forgot_is_queued_again(self, shed, renter):
        unit, credential = shed
        allocation = picked_up(unit, renter, ago_s=settings.AGENT_LOST_GRACE.total_seconds() + 5, restartable=True)

        heartbeat(credential, running=[])

        assert state_of(allocation) == Job.State.QUEUED

    def test_a_just_pulled_job_gets_a_grace_period(self, shed, renter):
        """The pull's answer and the next heartbeat can cross on the wire."""
        unit, credential = shed
        allocation = picked_up(unit, renter, ago_s=1)

        heartbeat(credential, running=[])

        assert state_of(allocation) == Job.State.RUNNING

    def test_another_units_heartbeat_cannot_touch_this_units_jobs(self, shed, owner, renter):
        unit, _ = shed
        allocation = picked_up(unit, renter, ago_s=3600)
        _, other_credential = unit_online(owner, name="other", gpus=2)

        body = {"gpus": [vars(g) for g in gpus_make(2, prefix="GPU-other")], "running": []}
        agent_client(other_credential).post("/api/agent/v1/heartbeat", body, format="json")

        assert state_of(allocation) == Job.State.RUNNING
