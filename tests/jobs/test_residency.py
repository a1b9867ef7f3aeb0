"""Residency is enforced for as long as a job runs (marketplace/jobs/residency.py): a unit whose
location no longer meets a running job's rules stops it, the renter reads why, the owner is
warned before saving a location that would do so, and nothing after the breach is billed."""

from dataclasses import asdict

import pytest
from django.test import Client

from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.placement import job_place
from marketplace.kernel.models import AuditEvent
from nodes.agent import protocol
from nodes.models import Unit
from nodes.services import unit_location_attest, unit_location_attestation_revoke, unit_location_declare
from tests.conftest import agent_client, gpus_make, job_make, renter_client, unit_online, user_make

IN_FRANCE = "193.51.224.1"  # RENATER, the French research network
IN_THE_US = "8.8.8.8"
AGENT = "/api/agent/v1"


@pytest.fixture
def operator(db):
    return user_make("oscar-operator", is_staff=True, is_superuser=True)


@pytest.fixture
def shed(owner):
    """A unit declared in France, its agent calling from a French address (verified)."""
    unit, credential = unit_online(owner, name="shed", country="FR", gpus=2)
    agent = agent_client(credential)
    beat(agent, IN_FRANCE)
    unit = Unit.objects.get(pk=unit.pk)
    assert unit.location_verified
    return unit, agent


def beat(agent, address: str, running: list[str] = ()):
    body = {"gpus": [asdict(gpu) for gpu in gpus_make(2, prefix="GPU-shed")], "running": list(running)}
    response = agent.post(f"{AGENT}/heartbeat", body, format="json", REMOTE_ADDR=address)
    assert response.status_code == 200, response.content
    return response.json()


def running_job(renter, agent, **spec) -> tuple[Job, Allocation]:
    job = job_make(renter, **spec)
    allocation = job_place(job_id=job.pk)
    assert allocation is not None
    assert agent.get(f"{AGENT}/assignments/next").status_code == 200
    assert agent.post(f"{AGENT}/allocations/{allocation.pk}/start").status_code == 200
    return Job.objects.get(pk=job.pk), allocation


def renter_events(renter, job) -> list[dict]:
    response = renter_client(renter).get(f"/api/v1/jobs/{job.pk}/events")
    assert response.status_code == 200, response.content
    return response.json()["results"]


class TestAJobStoppedWhenTheUnitMoves:
    def test_a_restartable_job_is_stopped_with_the_notice_and_queued_again_elsewhere(self, shed, renter, owner):
        unit, agent = shed
        job, allocation = running_job(
            renter, agent, jurisdictions=["FR"], require_verified_location=True, restartable=True
        )
        attempts = job.attempts

        unit_location_declare(unit=unit, country="US", actor=f"user:{owner.pk}")

        stopped = Allocation.objects.get(pk=allocation.pk)
        assert (stopped.stop_reason, stopped.preempted_at is not None) == ("residency", True)
        reply = beat(agent, IN_FRANCE, running=[str(allocation.pk)])
        assert str(allocation.pk) in reply["preempt"]  # SIGTERM now, the job's notice
        finish = {"exit_code": None, "reason": protocol.Finish.PREEMPTED}
        assert agent.post(f"{AGENT}/allocations/{allocation.pk}/finish", finish, format="json").status_code == 200

        job.refresh_from_db()
        # Not the job's doing: the attempt its placement used is given back.
        assert (job.state, job.attempts) == (Job.State.QUEUED, attempts - 1)
        assert Allocation.objects.get(pk=allocation.pk).release_reason == "residency"
        breach = AuditEvent.objects.get(action="job.residency_breached", subject_id=job.pk)
        assert (breach.data["reason"], breach.data["country"], breach.actor) == ("jurisdiction", "US", "residency")
        # Placed again only where the rules hold: not on this unit, now declared in the US.
        assert job_place(job_id=job.pk) is None
        assert Job.objects.get(pk=job.pk).pending_reason["rejected"] == {"jurisdiction": 1}

    def test_a_job_that_cannot_restart_fails_with_the_reason_and_the_agent_is_told_to_stop(self, shed, renter, owner):
        unit, agent = shed
        job, allocation = running_job(renter, agent, jurisdictions=["FR"], restartable=False)

        unit_location_declare(unit=unit, country="US", actor=f"user:{owner.pk}")

        job.refresh_from_db()
        assert job.state == Job.State.FAILED
        assert job.failure_reason.startswith("residency: the unit is no longer in a place the job allows")
        reply = beat(agent, IN_FRANCE, running=[str(allocation.pk)])
        assert str(allocation.pk) in reply["cancel"]
        # The slices stay held until the agent says the process has stopped.
        assert Allocation.objects.get(pk=allocation.pk).released_at is None

    def test_the_renter_reads_the_breach_and_its_rule_in_the_jobs_timeline(self, shed, renter, owner):
        unit, agent = shed
        job, _ = running_job(renter, agent, jurisdictions=["FR"], restartable=False)

        unit_location_declare(unit=unit, country="US", actor=f"user:{owner.pk}")

        events = {event["action"]: event for event in renter_events(renter, job)}
        assert events["job.residency_breached"]["detail"]["reason"] == "jurisdiction"
        assert events["job.residency_breached"]["actor"] == "residency"
        assert "job.stopped" in events
        placements = renter_client(renter).get(f"/api/v1/jobs/{job.pk}/placements").json()
        assert [(p["country"], p["stop_reason"]) for p in placements] == [("FR", "residency")]

    def test_a_mismatch_seen_from_the_agents_address_stops_restricted_jobs_only(self, shed, renter):
        unit, agent = shed
        restricted, held = running_job(renter, agent, jurisdictions=["EU"], restartable=False)
        anywhere, free = running_job(renter, agent, restartable=False)

        beat(agent, IN_THE_US, running=[str(held.pk), str(free.pk)])

        assert Job.objects.get(pk=restricted.pk).state == Job.State.FAILED
        assert Job.objects.get(pk=anywhere.pk).state == Job.State.RUNNING
        assert Allocation.objects.get(pk=free.pk).preempted_at is None

    def test_a_revoked_attestation_stops_jobs_that_needed_it_and_keeps_the_rest(self, owner, renter, operator):
        unit, credential = unit_online(owner, name="attested", country="FR", gpus=2)
        unit_location_attest(unit=unit, by=operator)
        agent = agent_client(credential)
        needs_proof, _ = running_job(renter, agent, jurisdictions=["FR"], require_verified_location=True)
        declared_is_enough, _ = running_job(renter, agent, jurisdictions=["FR"])

        unit_location_attestation_revoke(unit=Unit.objects.get(pk=unit.pk), by=operator)

        assert Allocation.objects.get(job=needs_proof).stop_reason == "residency"
        assert Allocation.objects.get(job=declared_is_enough).preempted_at is None

    def test_a_job_not_yet_picked_up_is_withdrawn_and_queued_again(self, shed, renter, owner):
        unit, _ = shed
        job = job_make(renter, jurisdictions=["FR"])
        allocation = job_place(job_id=job.pk)

        unit_location_declare(unit=unit, country="DE", actor=f"user:{owner.pk}")

        assert Job.objects.get(pk=job.pk).state == Job.State.QUEUED
        assert Allocation.objects.get(pk=allocation.pk).release_reason == "residency"

    def test_a_location_change_that_breaks_no_rule_stops_nothing(self, shed, renter, owner):
        unit, agent = shed
        job, allocation = running_job(renter, agent, jurisdictions=["EU"])

        unit_location_declare(unit=unit, country="FR", subdivision="FR-IDF", actor=f"user:{owner.pk}")

        assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING
        assert not AuditEvent.objects.filter(action="job.residency_breached").exists()


class TestTheOwnerIsWarnedFirst:
    def url(self, unit):
        return f"/portal/units/{unit.pk}/location/"

    def test_the_form_lists_the_jobs_it_would_stop_and_changes_nothing_until_confirmed(self, shed, renter, owner):
        unit, agent = shed
        job, allocation = running_job(renter, agent, jurisdictions=["FR"], name="fr-training")
        portal = Client()
        portal.force_login(owner)

        warned = portal.post(self.url(unit), {"country": "US", "subdivision": ""})

        assert warned.status_code == 409
        page = warned.content.decode()
        assert "Saving this location stops 1 running job" in page and "fr-training" in page
        assert Unit.objects.get(pk=unit.pk).country.code == "FR"
        assert Allocation.objects.get(pk=allocation.pk).preempted_at is None

        confirmed = portal.post(self.url(unit), {"country": "US", "subdivision": "", "confirm_stops": "yes"})

        assert confirmed.status_code == 302
        assert Unit.objects.get(pk=unit.pk).country.code == "US"
        assert Allocation.objects.get(pk=allocation.pk).stop_reason == "residency"

    def test_a_change_that_stops_nothing_saves_at_once(self, shed, renter, owner):
        unit, agent = shed
        running_job(renter, agent, jurisdictions=["EU"])
        portal = Client()
        portal.force_login(owner)

        response = portal.post(self.url(unit), {"country": "FR", "subdivision": "FR-IDF"})

        assert response.status_code == 302
        assert Unit.objects.get(pk=unit.pk).subdivision == "FR-IDF"
