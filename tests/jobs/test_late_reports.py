"""After a fault, no false verdicts and fair money: a report for an allocation already let go
never changes its job, a job whose start the agent never confirmed is queued again rather than
lost, and usage recorded after a release is not charged."""

from datetime import timedelta

import pytest

from billing.services import usage_post
from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.placement import job_place
from marketplace.jobs.selectors import allocations_with_usage
from marketplace.jobs.services import unit_jobs_lost
from marketplace.jobs.usage import SampleReport, usage_record
from nodes.models import Unit
from tests.conftest import agent_client, job_make, unit_online

AGENT = "/api/agent/v1"


@pytest.fixture
def sheds(owner):
    first, first_credential = unit_online(owner, name="first", gpus=1)
    second, second_credential = unit_online(owner, name="second", gpus=1)
    return (first, agent_client(first_credential)), (second, agent_client(second_credential))


def pulled(agent, *, start: bool) -> str:
    allocation_id = agent.get(f"{AGENT}/assignments/next").json()["allocation_id"]
    if start:
        assert agent.post(f"{AGENT}/allocations/{allocation_id}/start").status_code == 200
    return allocation_id


def offline(unit) -> None:
    Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.OFFLINE)
    unit_jobs_lost(unit=unit)


def test_a_buffered_finish_of_a_lost_attempt_leaves_the_new_attempt_running(sheds, renter):
    (first, first_agent), (second, second_agent) = sheds
    job = job_make(renter, restartable=True)
    assert job_place(job_id=job.pk).unit_id in (first.pk, second.pk)
    old_unit, old_agent, new_agent = (
        (first, first_agent, second_agent)
        if Allocation.objects.get(job=job).unit_id == first.pk
        else (second, second_agent, first_agent)
    )
    old = pulled(old_agent, start=True)
    offline(old_unit)
    assert Job.objects.get(pk=job.pk).state == Job.State.QUEUED
    assert job_place(job_id=job.pk) is not None
    pulled(new_agent, start=True)

    late = old_agent.post(f"{AGENT}/allocations/{old}/finish", {"exit_code": 0}, format="json")

    assert late.status_code == 200
    job.refresh_from_db()
    assert (job.state, job.exit_code) == (Job.State.RUNNING, None)
    assert Allocation.objects.get(pk=old).release_reason == "unit_offline"


def test_a_job_pulled_but_never_started_is_queued_again_not_lost(sheds, renter):
    (first, first_agent), (second, second_agent) = sheds
    job = job_make(renter, restartable=False)
    allocation = job_place(job_id=job.pk)
    agent = first_agent if allocation.unit_id == first.pk else second_agent
    pulled(agent, start=False)  # the agent died in the instant after it pulled the job

    offline(allocation.unit)

    assert Job.objects.get(pk=job.pk).state == Job.State.QUEUED


def test_a_job_that_ran_and_cannot_restart_is_still_lost(sheds, renter):
    (first, first_agent), (second, second_agent) = sheds
    job = job_make(renter, restartable=False)
    allocation = job_place(job_id=job.pk)
    pulled(first_agent if allocation.unit_id == first.pk else second_agent, start=True)

    offline(allocation.unit)

    assert Job.objects.get(pk=job.pk).state == Job.State.LOST


def test_usage_recorded_after_the_release_is_not_charged_but_buffered_usage_before_it_is(sheds, renter):
    (first, first_agent), (second, second_agent) = sheds
    job = job_make(renter, restartable=False)
    allocation = job_place(job_id=job.pk)
    pulled(first_agent if allocation.unit_id == first.pk else second_agent, start=True)
    offline(allocation.unit)  # the renter is told the job was lost now
    released = Allocation.objects.get(pk=allocation.pk).released_at

    # The agent, cut off meanwhile, delivers what it buffered: time before the release and after.
    before = SampleReport(seq=1, gpu_ms=700, recorded_at=released - timedelta(milliseconds=1))
    after = SampleReport(seq=2, gpu_ms=900, recorded_at=released + timedelta(seconds=5))
    assert usage_record(allocation=Allocation.objects.get(pk=allocation.pk), samples=[before, after]) == (2, 0)
    usage_post(allocation_id=allocation.pk)

    billed = allocations_with_usage(Allocation.objects.filter(pk=allocation.pk)).get()
    assert billed.usage_gpu_ms == 700


def agent_of(sheds, allocation):
    return next(agent for unit, agent in sheds if unit.pk == allocation.unit_id)


@pytest.mark.parametrize("reason", ["drained", "agent_stopped"])
@pytest.mark.parametrize(("restartable", "ends"), [(True, Job.State.QUEUED), (False, Job.State.LOST)])
def test_a_job_stopped_because_its_shed_was_stopped_did_not_fail(sheds, renter, reason, restartable, ends):
    """The owner stopped the agent while the job ran: the job is the unit's casualty, not its own
    failure: queued again when restartable, else lost, and never 'failed' with the stop's code."""
    job = job_make(renter, restartable=restartable)
    agent = agent_of(sheds, job_place(job_id=job.pk))
    allocation_id = pulled(agent, start=True)

    finished = agent.post(f"{AGENT}/allocations/{allocation_id}/finish", {"exit_code": 143, "reason": reason},
                          format="json")  # fmt: skip

    assert finished.status_code == 200, finished.content
    job.refresh_from_db()
    assert job.state == ends
    assert Allocation.objects.get(pk=allocation_id).released_at is not None
    if ends == Job.State.LOST:
        assert "agent was stopped" in job.failure_reason


def test_a_job_that_ended_by_itself_while_its_shed_drained_is_done(sheds, renter):
    job = job_make(renter)
    agent = agent_of(sheds, job_place(job_id=job.pk))
    allocation_id = pulled(agent, start=True)

    agent.post(f"{AGENT}/allocations/{allocation_id}/finish", {"exit_code": 0, "reason": "drained"}, format="json")

    job.refresh_from_db()
    assert job.state == Job.State.SUCCEEDED
