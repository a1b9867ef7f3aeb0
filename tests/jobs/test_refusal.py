"""An agent refuses an assignment its unit cannot honour: the job goes elsewhere, and the refusing
unit is kept away from it (for REFUSAL_HOLD_S after a refusal for limits, for good otherwise). A
refusal is never one of the job's attempts, so refusing units cannot make a job fail."""

from datetime import timedelta

import pytest

from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import job_cancel
from marketplace.kernel.models import AuditEvent
from tests.conftest import agent_client, job_make, unit_online

AGENT = "/api/agent/v1"
NEXT = f"{AGENT}/assignments/next"


def finish_url(allocation) -> str:
    return f"{AGENT}/allocations/{allocation.pk}/finish"


@pytest.fixture
def cheap(owner):
    unit, credential = unit_online(owner, name="cheap", gpus=2, price_per_gpu_hour_micros=1_000_000)
    return unit, agent_client(credential)


@pytest.fixture
def dear(owner):
    unit, credential = unit_online(owner, name="dear", gpus=2, price_per_gpu_hour_micros=3_000_000)
    return unit, agent_client(credential)


def refuse(agent, allocation, reason: str = "refused:residency"):
    assert agent.get(NEXT).status_code == 200
    response = agent.post(finish_url(allocation), {"exit_code": None, "reason": reason}, format="json")
    assert response.status_code == 200, response.content
    return response


def test_a_refused_job_is_queued_again_and_its_gpus_freed(cheap, renter):
    unit, agent = cheap
    job = job_make(renter)
    allocation = job_place(job_id=job.pk)

    response = refuse(agent, allocation)

    assert response.json() == {"state": "queued"}
    job.refresh_from_db()
    allocation.refresh_from_db()
    assert (job.state, job.attempts, job.refusals, job.placed_at, job.exit_code) == (
        Job.State.QUEUED, 0, 1, None, None
    )  # fmt: skip
    assert allocation.release_reason == "refused:residency"
    assert not allocation.leases.filter(released_at__isnull=True).exists()
    refused = AuditEvent.objects.get(action="allocation.refused", subject_id=job.pk)
    assert refused.actor == f"unit:{unit.pk}"
    assert refused.data == {"allocation": str(allocation.pk), "unit": str(unit.pk), "reason": "refused:residency"}


def test_placement_never_sends_the_job_back_to_the_unit_that_refused_it(cheap, dear, renter):
    (cheap_unit, cheap_agent), (dear_unit, _) = cheap, dear
    job = job_make(renter)
    first = job_place(job_id=job.pk)
    assert first.unit_id == cheap_unit.pk
    refuse(cheap_agent, first, "refused:isolation")

    second = job_place(job_id=job.pk)

    assert second is not None and second.unit_id == dear_unit.pk


def test_a_job_only_refusing_units_could_take_stays_pending_and_says_why(cheap, renter):
    _, agent = cheap
    job = job_make(renter)
    refuse(agent, job_place(job_id=job.pk))

    assert job_place(job_id=job.pk) is None

    job.refresh_from_db()
    assert job.state == Job.State.QUEUED
    assert job.pending_reason["rejected"] == {"unit_refused": 1}


def test_refusals_never_use_up_a_jobs_attempts(cheap, dear, owner, renter, settings):
    settings.JOB_MAX_ATTEMPTS = 1
    third = agent_client(unit_online(owner, name="third", gpus=2, price_per_gpu_hour_micros=5_000_000)[1])
    job = job_make(renter)
    for agent, reason in ((cheap[1], "refused:limits"), (dear[1], "refused:devices"), (third, "refused:limits")):
        response = refuse(agent, job_place(job_id=job.pk), reason)
        assert response.json() == {"state": "queued"}

    assert job_place(job_id=job.pk) is None
    job.refresh_from_db()
    assert (job.state, job.attempts, job.refusals, job.failure_reason) == (Job.State.QUEUED, 0, 3, "")
    assert job.pending_reason["rejected"] == {"unit_refused": 3}


def test_a_repeated_refusal_changes_nothing_even_after_the_job_moved_on(cheap, dear, renter):
    _, agent = cheap
    job = job_make(renter)
    first = job_place(job_id=job.pk)
    refuse(agent, first)
    second = job_place(job_id=job.pk)

    again = agent.post(finish_url(first), {"exit_code": None, "reason": "refused:residency"}, format="json")

    assert again.status_code == 200
    job.refresh_from_db()
    assert job.state == Job.State.PLACED and job.allocations.get(released_at__isnull=True) == second
    assert AuditEvent.objects.filter(action="allocation.refused", subject_id=job.pk).count() == 1


def test_refusing_a_job_cancelled_meanwhile_frees_its_gpus_and_keeps_it_cancelled(cheap, renter):
    _, agent = cheap
    job = job_make(renter)
    allocation = job_place(job_id=job.pk)
    assert agent.get(NEXT).status_code == 200
    job_cancel(job=job, actor="test")

    agent.post(finish_url(allocation), {"exit_code": None, "reason": "refused:residency"}, format="json")

    job.refresh_from_db()
    assert job.state == Job.State.CANCELLED
    assert not allocation.leases.filter(released_at__isnull=True).exists()


def test_other_failures_before_the_start_still_end_the_job(cheap, renter):
    _, agent = cheap
    job = job_make(renter)
    allocation = job_place(job_id=job.pk)
    agent.get(NEXT)

    agent.post(finish_url(allocation), {"exit_code": None, "reason": "start_failed"}, format="json")

    job.refresh_from_db()
    assert (job.state, job.failure_reason) == (Job.State.FAILED, "start_failed")


def test_a_refusal_for_backyard_limits_keeps_the_unit_away_for_the_hold_only(cheap, renter, settings):
    """Quiet hours or heat pass, so the job may come back to the same shed, but not before
    REFUSAL_HOLD_S: a unit answering everything with `refused:limits` gets the job once."""
    unit, agent = cheap
    job = job_make(renter)
    first = job_place(job_id=job.pk)
    refuse(agent, first, "refused:limits")

    assert job_place(job_id=job.pk) is None
    Allocation.objects.filter(pk=first.pk).update(
        released_at=first.created_at - timedelta(seconds=settings.REFUSAL_HOLD_S + 1)
    )
    again = job_place(job_id=job.pk)

    assert again is not None and again.unit_id == unit.pk


def test_other_refusals_keep_the_unit_away_after_the_hold_too(cheap, renter, settings):
    _, agent = cheap
    job = job_make(renter)
    first = job_place(job_id=job.pk)
    refuse(agent, first, "refused:isolation")
    Allocation.objects.filter(pk=first.pk).update(
        released_at=first.created_at - timedelta(seconds=settings.REFUSAL_HOLD_S + 1)
    )

    assert job_place(job_id=job.pk) is None


def test_a_start_the_shed_could_not_get_confirmed_queues_the_job_again(cheap, renter):
    """The agent gave up confirming the start through a marketplace outage: nothing ran, so the
    job is not failed but queued again (not restartable: it never started)."""
    _, agent = cheap
    job = job_make(renter)
    allocation = job_place(job_id=job.pk)
    agent.get(NEXT)

    agent.post(finish_url(allocation), {"exit_code": None, "reason": "start_unconfirmed"}, format="json")

    job.refresh_from_db()
    allocation.refresh_from_db()
    assert job.state == Job.State.QUEUED and job.failure_reason == ""
    assert allocation.release_reason == "start_unconfirmed"
