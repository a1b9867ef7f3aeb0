"""An agent refuses an assignment its unit cannot honour: the job goes elsewhere, never back there."""

import pytest

from marketplace.jobs.models import Job
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
    assert (job.state, job.attempts, job.placed_at, job.exit_code) == (Job.State.QUEUED, 1, None, None)
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


def test_a_job_refused_until_its_attempts_run_out_fails_saying_so(cheap, dear, renter, settings):
    settings.JOB_MAX_ATTEMPTS = 2
    job = job_make(renter)
    refuse(cheap[1], job_place(job_id=job.pk))

    response = refuse(dear[1], job_place(job_id=job.pk), "refused:devices")

    assert response.json() == {"state": "failed"}
    job.refresh_from_db()
    assert (job.state, job.attempts) == (Job.State.FAILED, 2)
    assert job.failure_reason == "refused by unit: refused:devices"
    assert job.finished_at is not None


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


def test_a_refusal_for_backyard_limits_keeps_the_unit_a_candidate(cheap, renter):
    """Quiet hours or heat pass; the job may come back to the same shed later."""
    unit, agent = cheap
    job = job_make(renter)
    refuse(agent, job_place(job_id=job.pk), "refused:limits")

    again = job_place(job_id=job.pk)

    assert again is not None and again.unit_id == unit.pk
