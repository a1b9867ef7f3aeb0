"""Units that stop heartbeating turn suspect, then offline, and their jobs are re-queued or lost."""

import http.server
import threading
from datetime import datetime, timedelta
from unittest import mock

import pytest
from django.conf import settings
from django.utils import timezone

from marketplace.jobs import services as jobs_services
from marketplace.jobs.models import Allocation, Job, Lease
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import allocation_pull, allocation_start, unit_jobs_lost
from marketplace.kernel.models import AuditEvent
from nodes import tasks
from nodes.models import Unit
from nodes.services import ingest_reachable, unit_heartbeat, units_mark_unresponsive
from tests.conftest import agent_client, gpus_make, job_make, unit_online
from tests.e2e import free_port

RETRY_AFTER_S = settings.OUTAGE_RETRY_AFTER_S  # what agents were told to wait during an outage


def silent_for(unit: Unit, seconds: float) -> datetime:
    """Make the unit's last heartbeat `seconds` old; returns the 'now' to sweep with."""
    now = timezone.now()
    Unit.objects.filter(pk=unit.pk).update(last_heartbeat_at=now - timedelta(seconds=seconds))
    return now


def sweep_every(period_s: float, *, since: datetime, for_s: float) -> list[Unit]:
    """Sweep as beat does, every period_s after ``since`` for for_s seconds; returns the units
    that went offline."""
    gone, elapsed = [], 0.0
    while elapsed < for_s:
        elapsed += period_s
        gone += units_mark_unresponsive(now=since + timedelta(seconds=elapsed))
    return gone


def status_of(unit: Unit) -> str:
    return Unit.objects.get(pk=unit.pk).status


def running_on(unit: Unit, renter, **spec) -> Allocation:
    job = job_make(renter, **spec)
    allocation = job_place(job_id=job.pk)
    assert allocation is not None and allocation.unit_id == unit.pk
    assert allocation_pull(unit=unit) == allocation
    allocation_start(allocation=allocation)
    return allocation


def go_offline(unit: Unit) -> None:
    units_mark_unresponsive(now=silent_for(unit, 60))
    assert status_of(unit) == Unit.Status.OFFLINE
    unit_jobs_lost(unit=unit)


@pytest.fixture
def shed_and_credential(owner) -> tuple[Unit, str]:
    return unit_online(owner, name="shed", gpus=2)


@pytest.fixture
def shed(shed_and_credential) -> Unit:
    return shed_and_credential[0]


class TestUnitStatus:
    def test_a_fresh_heartbeat_keeps_the_unit_online(self, shed):
        assert units_mark_unresponsive(now=silent_for(shed, 5)) == []

        assert status_of(shed) == Unit.Status.ONLINE

    def test_twenty_seconds_of_silence_makes_a_unit_suspect(self, shed):
        gone = units_mark_unresponsive(now=silent_for(shed, 20))

        assert gone == []
        assert status_of(shed) == Unit.Status.SUSPECT
        assert AuditEvent.objects.filter(action="unit.went_suspect", subject_id=shed.pk).exists()

    def test_sixty_seconds_of_silence_makes_a_unit_offline_in_one_sweep(self, shed):
        gone = units_mark_unresponsive(now=silent_for(shed, 60))

        assert [unit.pk for unit in gone] == [shed.pk]
        assert status_of(shed) == Unit.Status.OFFLINE
        actions = list(AuditEvent.objects.filter(subject_id=shed.pk).values_list("action", flat=True))
        assert actions[-2:] == ["unit.went_suspect", "unit.went_offline"]

    def test_a_suspect_unit_goes_offline_once_the_limit_passes(self, shed):
        now = silent_for(shed, 20)
        units_mark_unresponsive(now=now)
        assert status_of(shed) == Unit.Status.SUSPECT

        gone = sweep_every(2, since=now, for_s=40)

        assert [unit.pk for unit in gone] == [shed.pk]
        assert status_of(shed) == Unit.Status.OFFLINE


class TestTheServersOwnOutage:
    """No sweep for longer than LIVENESS_OUTAGE_AFTER: the server itself was away, so heartbeats
    could not have been stored; units are judged afresh from the sweep that follows."""

    def test_units_silent_only_while_the_server_was_away_are_given_a_fresh_grace(self, shed):
        before = silent_for(shed, 1)
        units_mark_unresponsive(now=before)  # the last sweep before the outage

        after = before + timedelta(seconds=65)  # the database was down for 65 s
        assert units_mark_unresponsive(now=after) == []
        assert status_of(shed) == Unit.Status.ONLINE

        sweep_every(2, since=after, for_s=settings.UNIT_SUSPECT_AFTER.total_seconds() + RETRY_AFTER_S - 2)
        assert status_of(shed) == Unit.Status.ONLINE  # still within the fresh grace and the wait agents were told

    def test_a_unit_still_silent_after_the_grace_is_judged_as_usual(self, shed):
        before = silent_for(shed, 1)
        units_mark_unresponsive(now=before)
        after = before + timedelta(seconds=65)
        units_mark_unresponsive(now=after)

        gone = sweep_every(2, since=after, for_s=settings.UNIT_OFFLINE_AFTER.total_seconds() + RETRY_AFTER_S + 4)

        assert status_of(shed) == Unit.Status.OFFLINE and [unit.pk for unit in gone] == [shed.pk]

    def test_sweeps_on_time_give_no_grace(self, shed):
        now = silent_for(shed, 1)
        units_mark_unresponsive(now=now)

        sweep_every(2, since=now, for_s=settings.UNIT_SUSPECT_AFTER.total_seconds() + 2)

        assert status_of(shed) == Unit.Status.SUSPECT

    def test_the_limits_are_the_settings(self, shed):
        just_under = settings.UNIT_SUSPECT_AFTER - timedelta(seconds=1)

        units_mark_unresponsive(now=silent_for(shed, just_under.total_seconds()))

        assert status_of(shed) == Unit.Status.ONLINE

    @pytest.mark.parametrize("status", [Unit.Status.PENDING, Unit.Status.RETIRED, Unit.Status.OFFLINE])
    def test_units_not_in_service_are_left_alone(self, shed, status):
        Unit.objects.filter(pk=shed.pk).update(status=status)

        assert units_mark_unresponsive(now=silent_for(shed, 600)) == []

        assert status_of(shed) == status

    def test_an_offline_unit_that_heartbeats_is_online_again(self, shed):
        units_mark_unresponsive(now=silent_for(shed, 60))

        unit_heartbeat(unit=Unit.objects.get(pk=shed.pk), gpus=gpus_make(2, prefix="GPU-shed"))

        assert status_of(shed) == Unit.Status.ONLINE


class TestTheWebServersOutage:
    """The web server is away (LIVENESS_PROBE_URL does not answer): no heartbeat could arrive, so
    sweeps on time hold their verdicts, and units get a fresh grace once it answers again."""

    def test_silence_while_the_web_server_is_away_proves_nothing(self, shed):
        now = silent_for(shed, 1)
        units_mark_unresponsive(now=now)

        for step in range(0, int(settings.UNIT_OFFLINE_AFTER.total_seconds()) + 10, 2):
            assert units_mark_unresponsive(now=now + timedelta(seconds=step), ingest_up=False) == []
        assert status_of(shed) == Unit.Status.ONLINE

    def test_the_grace_starts_again_when_it_answers_and_silence_counts_after(self, shed):
        now = silent_for(shed, 1)
        back = now + timedelta(seconds=60)
        units_mark_unresponsive(now=back, ingest_up=False)  # the last sweep that found it away

        sweep_every(2, since=back, for_s=settings.UNIT_SUSPECT_AFTER.total_seconds() - 2)
        assert status_of(shed) == Unit.Status.ONLINE
        sweep_every(2, since=back, for_s=settings.UNIT_OFFLINE_AFTER.total_seconds() + RETRY_AFTER_S + 4)
        assert status_of(shed) == Unit.Status.OFFLINE

    def test_the_probe_calls_only_no_answer_or_a_5xx_an_outage(self, settings, tmp_path):
        class Answer(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the standard library's name
                self.send_response(int(self.path.strip("/")))
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        try:
            answers = {}
            for status in (200, 400, 503):
                settings.LIVENESS_PROBE_URL = f"{base}/{status}"
                answers[status] = ingest_reachable()
            settings.LIVENESS_PROBE_URL = f"http://127.0.0.1:{free_port()}/healthz"
            answers["nothing listening"] = ingest_reachable()
            settings.LIVENESS_PROBE_URL = ""
            answers["not set"] = ingest_reachable()
        finally:
            server.shutdown()
        assert answers == {200: True, 400: True, 503: False, "nothing listening": False, "not set": True}

    def test_the_sweep_task_probes_the_web_server(self, shed, settings):
        settings.LIVENESS_PROBE_URL = f"http://127.0.0.1:{free_port()}/healthz"
        silent_for(shed, settings.UNIT_OFFLINE_AFTER.total_seconds() + 60)

        tasks.unit_liveness_sweep()

        assert status_of(shed) == Unit.Status.ONLINE


class TestJobsOfALostUnit:
    def test_a_non_restartable_job_is_lost_and_its_gpus_released(self, shed, renter):
        allocation = running_on(shed, renter)

        go_offline(shed)

        job = Job.objects.get(pk=allocation.job_id)
        assert job.state == Job.State.LOST
        assert job.failure_reason == "unit went offline"
        assert job.finished_at is not None
        allocation.refresh_from_db()
        assert allocation.released_at is not None
        assert allocation.release_reason == "unit_offline"
        assert not Lease.objects.filter(allocation=allocation, released_at__isnull=True).exists()

    def test_a_restartable_job_is_queued_again(self, shed, renter, django_capture_on_commit_callbacks):
        allocation = running_on(shed, renter, restartable=True)

        with django_capture_on_commit_callbacks() as enqueued:
            go_offline(shed)

        job = Job.objects.get(pk=allocation.job_id)
        assert job.state == Job.State.QUEUED
        assert job.attempts == 1
        assert job.placed_at is None and job.started_at is None
        assert not Lease.objects.filter(allocation=allocation, released_at__isnull=True).exists()
        assert enqueued, "a re-queued job must ask for placement"
        assert AuditEvent.objects.filter(action="job.requeued", subject_id=job.pk).exists()

    def test_a_restartable_job_is_lost_after_its_last_attempt(self, owner, renter):
        job = None
        for attempt in range(1, settings.JOB_MAX_ATTEMPTS + 1):
            unit, _ = unit_online(owner, name=f"shed-{attempt}", gpus=1)
            if job is None:
                job = running_on(unit, renter, restartable=True).job
            else:
                assert job_place(job_id=job.pk).unit_id == unit.pk
            go_offline(unit)
            job.refresh_from_db()
            assert job.attempts == attempt
            expected = Job.State.LOST if attempt == settings.JOB_MAX_ATTEMPTS else Job.State.QUEUED
            assert job.state == expected, f"after attempt {attempt}"

    def test_a_job_that_already_ended_is_left_alone(self, shed, renter):
        allocation = running_on(shed, renter)
        Job.objects.filter(pk=allocation.job_id).update(state=Job.State.CANCELLED)

        go_offline(shed)

        assert Job.objects.get(pk=allocation.job_id).state == Job.State.CANCELLED
        assert Allocation.objects.get(pk=allocation.pk).released_at is not None

    def test_the_returning_agent_is_told_to_stop_the_lost_job(self, shed_and_credential, renter):
        unit, credential = shed_and_credential
        allocation = running_on(unit, renter, restartable=True)
        go_offline(unit)
        gpus = [vars(gpu) for gpu in gpus_make(2, prefix="GPU-shed")]

        response = agent_client(credential).post(
            "/api/agent/v1/heartbeat", {"gpus": gpus, "running": [str(allocation.pk)]}, format="json"
        )

        assert response.json()["status"] == "online"
        assert response.json()["cancel"] == [str(allocation.pk)]

    def test_jobs_on_other_units_are_untouched(self, shed, owner, renter):
        other = unit_online(owner, name="other", gpus=1)[0]
        elsewhere = running_on(other, renter)

        running_on(shed, renter)
        go_offline(shed)

        assert Job.objects.get(pk=elsewhere.job_id).state == Job.State.RUNNING
        assert Allocation.objects.get(pk=elsewhere.pk).released_at is None


class TestSweepTask:
    def test_the_sweep_marks_the_unit_and_handles_its_jobs(self, shed, renter):
        allocation = running_on(shed, renter)
        silent_for(shed, 60)

        tasks.unit_liveness_sweep()

        assert status_of(shed) == Unit.Status.OFFLINE
        assert Job.objects.get(pk=allocation.job_id).state == Job.State.LOST

    def test_the_sweep_finishes_work_an_interrupted_sweep_left(self, shed, renter):
        allocation = running_on(shed, renter)
        Unit.objects.filter(pk=shed.pk).update(status=Unit.Status.OFFLINE)

        tasks.unit_liveness_sweep()

        assert Job.objects.get(pk=allocation.job_id).state == Job.State.LOST

    def test_the_sweep_only_visits_offline_units_with_open_allocations(self, shed, owner, renter):
        quiet = unit_online(owner, name="quiet", gpus=1)[0]
        Unit.objects.filter(pk=quiet.pk).update(status=Unit.Status.OFFLINE)
        running_on(shed, renter)
        Unit.objects.filter(pk=shed.pk).update(status=Unit.Status.OFFLINE)

        with mock.patch.object(jobs_services, "unit_jobs_lost", wraps=unit_jobs_lost) as handled:
            tasks.unit_liveness_sweep()

        assert [call.kwargs["unit"].pk for call in handled.call_args_list] == [shed.pk]
