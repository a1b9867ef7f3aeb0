"""Operators' tools for jobs and units (marketplace/jobs/admin.py, the runbook commands): cancel and
requeue a job through its services, drain a unit that misbehaves, each recorded with its operator;
a job that may be running is never queued a second time."""


import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import job_requeue, unit_jobs_lost
from marketplace.kernel.errors import StateConflict
from marketplace.kernel.models import AuditEvent
from nodes.agent import protocol
from nodes.models import Unit
from tests.conftest import admin_action, agent_client, command, job_make, unit_online, user_make

pytestmark = pytest.mark.django_db

AGENT = "/api/agent/v1"


@pytest.fixture
def clerk(db):
    """Staff who may look at jobs but change nothing."""
    user = user_make("clara-clerk", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename="view_job"))
    return user


@pytest.fixture
def shed(owner):
    unit, credential = unit_online(owner, name="shed", gpus=2)
    return unit, agent_client(credential)


def placed(renter, **spec) -> tuple[Job, Allocation]:
    job = job_make(renter, **spec)
    allocation = job_place(job_id=job.pk)
    assert allocation is not None
    return Job.objects.get(pk=job.pk), allocation


def running(renter, agent, **spec) -> tuple[Job, Allocation]:
    job, allocation = placed(renter, **spec)
    assert agent.get(f"{AGENT}/assignments/next").json()["allocation_id"] == str(allocation.pk)
    assert agent.post(f"{AGENT}/allocations/{allocation.pk}/start").status_code == 200
    return Job.objects.get(pk=job.pk), allocation


def lost(renter, shed) -> Job:
    unit, agent = shed
    job, _ = running(renter, agent, restartable=False)
    Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.OFFLINE)
    unit_jobs_lost(unit=unit)
    job.refresh_from_db()
    assert job.state == Job.State.LOST
    Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.ONLINE)
    return job


def actors(action: str, job) -> list[str]:
    return list(AuditEvent.objects.filter(action=action, subject_id=job.pk).values_list("actor", flat=True))


class TestAdminCancel:
    def test_the_operator_cancels_a_job_as_the_renter_would_and_is_named_for_it(self, operator, renter, shed):
        job, allocation = placed(renter)

        notes = admin_action(operator, "cancel_jobs", [job])

        assert notes == [f"{job}: cancelled."]
        assert Job.objects.get(pk=job.pk).state == Job.State.CANCELLED
        assert Allocation.objects.get(pk=allocation.pk).released_at is not None
        assert actors("job.cancelled", job) == [f"user:{operator.pk}"]

    def test_a_job_that_ended_is_reported_not_cancelled(self, operator, renter, shed):
        job = lost(renter, shed)

        assert admin_action(operator, "cancel_jobs", [job]) == [f"{job}: The job has already ended (lost)."]

    def test_staff_who_may_only_look_cannot_cancel(self, clerk, renter, shed, plain_static):
        job, _ = placed(renter)

        admin_action(clerk, "cancel_jobs", [job])

        assert Job.objects.get(pk=job.pk).state == Job.State.PLACED


class TestRequeue:
    def test_a_lost_job_is_queued_again_by_the_operator(self, operator, renter, shed):
        job = lost(renter, shed)

        notes = admin_action(operator, "requeue_jobs", [job])

        job.refresh_from_db()
        assert notes == [f"{job}: queued."]
        assert (job.state, job.finished_at, job.failure_reason) == (Job.State.QUEUED, None, "")
        assert actors("job.requeued", job)[-1] == f"user:{operator.pk}"
        assert job_place(job_id=job.pk) is not None

    def test_a_running_job_is_refused_it_may_be_running(self, operator, renter, shed):
        job, allocation = running(renter, shed[1])

        [note] = admin_action(operator, "requeue_jobs", [job])

        assert "it may be running, so it is not queued twice" in note
        assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING
        assert Allocation.objects.get(pk=allocation.pk).released_at is None

    def test_a_job_its_agent_picked_up_is_refused_too(self, renter, shed):
        job, _ = placed(renter)
        shed[1].get(f"{AGENT}/assignments/next")

        with pytest.raises(StateConflict, match="starting"):
            job_requeue(job=job, actor="user:1")

    def test_a_placement_no_agent_picked_up_is_withdrawn_and_queued(self, renter, shed):
        job, allocation = placed(renter)

        assert job_requeue(job=job, actor="user:1").state == Job.State.QUEUED
        assert Allocation.objects.get(pk=allocation.pk).release_reason == "requeued"

    def test_a_job_that_failed_by_its_own_exit_is_refused(self, renter, shed):
        job, allocation = running(renter, shed[1])
        shed[1].post(f"{AGENT}/allocations/{allocation.pk}/finish", {"exit_code": 3}, format="json")

        with pytest.raises(StateConflict, match=r"renter's doing \(exit code 3\)"):
            job_requeue(job=Job.objects.get(pk=job.pk), actor="user:1")

    def test_staff_who_may_only_look_cannot_requeue(self, clerk, renter, shed, plain_static):
        job = lost(renter, shed)

        admin_action(clerk, "requeue_jobs", [job])

        assert Job.objects.get(pk=job.pk).state == Job.State.LOST

    def test_the_command_requeues_and_says_so(self, renter, shed):
        job = lost(renter, shed)

        assert command("job_requeue", str(job.pk)) == (
            0,
            f"Job {job.pk}: lost -> queued; placement asked to place it.\n",
        )
        assert actors("job.requeued", job)[-1].startswith("operator:")

    @pytest.mark.parametrize("ref", ["not-a-uuid", "6f1d3c2e-5a4b-4e0f-9c1d-2b7a8e5f4c30"])
    def test_the_command_refuses_an_unknown_job(self, ref):
        assert command("job_requeue", ref) == (1, f"No job has the id {ref!r}.")

    def test_the_command_refuses_a_running_job_without_a_traceback(self, renter, shed):
        job, _ = running(renter, shed[1])

        code, out = command("job_requeue", str(job.pk))

        assert code == 1 and out.startswith("The job is running: its unit's agent has it")


class TestUnitDrain:
    def test_letting_jobs_finish_drains_and_leaves_them_running(self, renter, shed):
        unit, agent = shed
        job, _ = running(renter, agent)

        code, out = command("unit_drain", "shed", "--let-finish")

        assert code == 0 and out == f"Unit shed ({unit.pk}) is draining.\nIts running jobs go on to their end.\n"
        assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING
        assert Unit.objects.get(pk=unit.pk).status == Unit.Status.DRAINING

    def test_stopping_jobs_requeues_the_restartable_and_the_unstarted_and_fails_the_rest(self, renter, shed):
        unit, agent = shed
        again, again_allocation = running(renter, agent, restartable=True)
        once, _ = running(renter, agent, restartable=False)

        code, out = command("unit_drain", str(unit.pk), "--stop-jobs")

        assert code == 0 and "Stopped 2 job(s)" in out
        assert Job.objects.get(pk=once.pk).state == Job.State.FAILED
        assert Job.objects.get(pk=once.pk).failure_reason.startswith("drain:")
        stopping = Allocation.objects.get(pk=again_allocation.pk)
        assert (stopping.stop_reason, stopping.preempted_at is not None) == ("drained", True)
        finish = {"exit_code": None, "reason": protocol.Finish.PREEMPTED}
        assert agent.post(f"{AGENT}/allocations/{stopping.pk}/finish", finish, format="json").status_code == 200
        assert Job.objects.get(pk=again.pk).state == Job.State.QUEUED
        assert job_place(job_id=again.pk) is None  # drained: nothing is placed there any more
        # Stopped by the platform, not by its renter: the operator may queue it again.
        assert job_requeue(job=Job.objects.get(pk=once.pk), actor="user:1").state == Job.State.QUEUED

    def test_a_placement_not_picked_up_is_withdrawn_at_once(self, renter, shed):
        unit, _ = shed
        job, allocation = placed(renter)

        command("unit_drain", "shed", "--stop-jobs")

        assert Job.objects.get(pk=job.pk).state == Job.State.QUEUED
        assert Allocation.objects.get(pk=allocation.pk).release_reason == "drained"
        assert actors("job.drain_stopped", job)[0].startswith("operator:")

    def test_resume_takes_work_again(self, shed):
        unit, _ = shed
        command("unit_drain", "shed")

        assert command("unit_resume", "shed") == (0, f"Unit shed ({unit.pk}) is online.\n")
        assert command("unit_resume", "shed") == (1, "Unit shed is not draining (online).")

    def test_unknown_and_ambiguous_units_are_refused(self, owner, stranger, shed):
        unit_online(stranger, name="shed", gpus=1)

        assert command("unit_drain", "barn") == (1, "No unit has the id or name 'barn'.")
        code, out = command("unit_drain", "shed")
        assert code == 1 and out.startswith("2 units are named 'shed'; name one by its id:")

    def test_a_unit_that_is_offline_cannot_be_drained(self, shed):
        unit, _ = shed
        Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.OFFLINE)

        assert command("unit_drain", str(unit.pk)) == (1, "Only an online unit can be drained; this one is offline.")


def test_the_job_list_shows_each_job_s_unit_and_finds_jobs_by_it(operator, renter, shed, plain_static):
    job, _ = placed(renter)
    waiting = job_make(renter)
    client = Client()
    client.force_login(operator)

    page = client.get("/admin/jobs/job/?q=shed").content.decode()

    assert str(job.pk) in page and str(waiting.pk) not in page
    assert '<td class="field-unit">shed</td>' in page
