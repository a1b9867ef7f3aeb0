"""The node agent's API: heartbeat, assignment pull, start, usage and finish, each scoped to its own unit."""

from dataclasses import asdict

import pytest
from django.core.cache import cache
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.jobs import agent_use_cases as use_cases
from marketplace.jobs.models import Allocation, Job, UsageSample
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import job_cancel
from marketplace.kernel.api import longpoll
from marketplace.kernel.models import AuditEvent
from nodes.agent.backyard import Backyard, Policy
from nodes.models import GPU, Slice, Unit
from nodes.services import unit_enrol, unit_register
from tests.conftest import agent_client, gpus_make, job_make, problem_of, renter_client, unit_online

AGENT = "/api/agent/v1"
HEARTBEAT = f"{AGENT}/heartbeat"
NEXT = f"{AGENT}/assignments/next"


def report(count: int, *, prefix: str = "GPU-shed", **changes) -> list[dict]:
    return [{**asdict(gpu), **changes} for gpu in gpus_make(count, prefix=prefix)]


def start_url(allocation) -> str:
    return f"{AGENT}/allocations/{allocation.pk}/start"


def usage_url(allocation) -> str:
    return f"{AGENT}/allocations/{allocation.pk}/usage"


def finish_url(allocation) -> str:
    return f"{AGENT}/allocations/{allocation.pk}/finish"


def sample(seq: int, gpu_ms: int = 1000) -> dict:
    return {"seq": seq, "gpu_ms": gpu_ms, "recorded_at": timezone.now().isoformat()}


@pytest.fixture
def pending(owner):
    """An enrolled unit that has not sent a heartbeat yet, and its agent's client."""
    unit, token = unit_register(owner=owner, name="shed", country="DE")
    unit, credential = unit_enrol(token=token, hostname="shed.local", agent_version="test")
    return unit, agent_client(credential)


@pytest.fixture
def shed(owner):
    unit, credential = unit_online(owner, name="shed", gpus=2)
    return unit, agent_client(credential)


@pytest.fixture
def placed(shed, renter):
    """A single-GPU job placed on the shed, with its allocation."""
    unit, agent = shed
    job = job_make(renter)
    allocation = job_place(job_id=job.pk)
    assert allocation is not None and allocation.unit_id == unit.pk
    return job, allocation, agent


@pytest.fixture
def running(placed):
    job, allocation, agent = placed
    assert agent.get(NEXT).status_code == 200
    assert agent.post(start_url(allocation)).status_code == 200
    return job, allocation, agent


class TestHeartbeat:
    def test_the_first_heartbeat_brings_the_unit_online_with_its_gpus(self, pending):
        unit, agent = pending

        response = agent.post(HEARTBEAT, {"gpus": report(3), "agent_version": "1.2.3"}, format="json")

        assert response.status_code == 200, response.content
        assert response.json()["status"] == "online"
        assert response.json()["cancel"] == []
        unit.refresh_from_db()
        assert unit.status == Unit.Status.ONLINE
        assert unit.last_heartbeat_at is not None
        assert unit.agent_version == "1.2.3"
        assert sorted(unit.gpus.values_list("device_uuid", flat=True)) == ["GPU-shed-0", "GPU-shed-1", "GPU-shed-2"]
        slices = Slice.objects.filter(unit=unit)
        assert slices.count() == 3
        assert {(s.kind, s.isolation, s.vram_mb, s.advertised) for s in slices} == {("whole", "gpu", 81920, True)}
        assert all(s.price_per_gpu_hour_micros == unit.price_per_gpu_hour_micros for s in slices)

    def test_a_repeated_identical_heartbeat_changes_nothing(self, pending, django_capture_on_commit_callbacks):
        unit, agent = pending
        agent.post(HEARTBEAT, {"gpus": report(2)}, format="json")
        before_gpus = list(GPU.objects.filter(unit=unit).order_by("index").values())
        before_slices = list(Slice.objects.filter(unit=unit).order_by("gpu__index").values())
        before_audit = AuditEvent.objects.count()

        with django_capture_on_commit_callbacks() as enqueued:
            response = agent.post(HEARTBEAT, {"gpus": report(2)}, format="json")

        assert response.status_code == 200
        assert list(GPU.objects.filter(unit=unit).order_by("index").values()) == before_gpus
        assert list(Slice.objects.filter(unit=unit).order_by("gpu__index").values()) == before_slices
        assert AuditEvent.objects.count() == before_audit
        assert enqueued == [], "an unchanged inventory must not trigger a placement pass"

    def test_new_capacity_asks_for_a_placement_pass(self, pending, django_capture_on_commit_callbacks):
        _, agent = pending

        with django_capture_on_commit_callbacks() as enqueued:
            agent.post(HEARTBEAT, {"gpus": report(2)}, format="json")

        assert len(enqueued) == 1

    def test_a_gpu_missing_from_a_later_report_stops_being_advertised(self, shed):
        unit, agent = shed

        agent.post(HEARTBEAT, {"gpus": report(1)}, format="json")

        gone = GPU.objects.get(unit=unit, device_uuid="GPU-shed-1")
        assert gone.present is False
        assert gone.slices.get().advertised is False
        kept = GPU.objects.get(unit=unit, device_uuid="GPU-shed-0")
        assert kept.present is True
        assert kept.slices.get().advertised is True

    def test_a_gpu_that_returns_is_advertised_again(self, shed):
        unit, agent = shed
        agent.post(HEARTBEAT, {"gpus": report(1)}, format="json")

        agent.post(HEARTBEAT, {"gpus": report(2)}, format="json")

        assert GPU.objects.filter(unit=unit, present=True).count() == 2
        assert Slice.objects.filter(unit=unit, advertised=True).count() == 2
        assert GPU.objects.filter(unit=unit).count() == 2

    def test_an_unhealthy_gpu_is_not_advertised(self, shed):
        unit, agent = shed
        gpus = report(2)
        gpus[1]["healthy"] = False

        agent.post(HEARTBEAT, {"gpus": gpus}, format="json")

        assert list(Slice.objects.filter(unit=unit).order_by("gpu__index").values_list("advertised", flat=True)) == [
            True,
            False,
        ]

    def test_a_suspect_unit_comes_back_online(self, shed):
        unit, agent = shed
        Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.SUSPECT)

        response = agent.post(HEARTBEAT, {"gpus": report(2)}, format="json")

        assert response.json()["status"] == "online"
        assert Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE

    @pytest.mark.parametrize(
        "payload, field",
        [
            pytest.param({"gpus": report(1) + report(1)}, "gpus", id="duplicate-uuids"),
            pytest.param({"gpus": report(1, index="zero")}, "gpus", id="index-not-a-number"),
            pytest.param({"gpus": report(1, vram_mb=-1)}, "gpus", id="negative-vram"),
            pytest.param({"gpus": report(1, healthy="maybe")}, "gpus", id="health-not-a-boolean"),
            pytest.param({"gpus": "four"}, "gpus", id="gpus-not-a-list"),
            pytest.param({"gpus": [1, 2]}, "gpus", id="gpu-not-an-object"),
            pytest.param({}, "gpus", id="no-gpus"),
            pytest.param({"gpus": [], "running": ["not-a-uuid"]}, "running", id="running-not-uuids"),
            pytest.param({"gpus": [], "limits": {"in_force": 5}}, "limits", id="limits-in-force-not-a-list"),
            pytest.param({"gpus": [], "limits": {"in_force": [{"x": 1}]}}, "limits", id="limit-not-a-name"),
            pytest.param({"gpus": [], "limits": {"in_force": ["<b>"]}}, "limits", id="limit-name-not-a-slug"),
            pytest.param({"gpus": [], "limits": {"surprise": 1}}, "limits", id="limits-unknown-key"),
            pytest.param({"gpus": [], "limits": {"gpus": 2.5}}, "limits", id="limits-gpus-not-whole"),
            pytest.param({"gpus": [], "limits": {"gpus": 2, "advertised_gpus": 3}}, "limits", id="more-offered"),
            pytest.param({"gpus": [], "limits": [1]}, "limits", id="limits-not-an-object"),
        ],
    )
    def test_a_malformed_heartbeat_is_refused_with_400(self, shed, payload, field):
        unit, agent = shed
        before = unit.last_heartbeat_at

        body = problem_of(agent.post(HEARTBEAT, payload, format="json"), 400)

        assert field in body["errors"]
        assert Unit.objects.get(pk=unit.pk).last_heartbeat_at == before
        assert GPU.objects.filter(unit=unit).count() == 2

    def test_the_limits_the_agent_reports_are_stored_as_the_protocol_says(self, shed):
        unit, agent = shed
        limits = Backyard().evaluate(Policy(), [], set(), timezone.now()).report(total=2)

        assert agent.post(HEARTBEAT, {"gpus": report(2), "limits": limits}, format="json").status_code == 200
        assert Unit.objects.get(pk=unit.pk).limits == limits == {"in_force": [], "advertised_gpus": 0, "gpus": 2}

    def test_a_heartbeat_that_is_not_json_is_refused_with_400(self, shed):
        _, agent = shed

        problem_of(agent.post(HEARTBEAT, "{gpus:", content_type="application/json"), 400)


class TestAssignments:
    def test_no_work_is_a_204(self, shed):
        _, agent = shed

        response = agent.get(NEXT)

        assert response.status_code == 204
        assert response.content == b""

    def test_a_placed_job_is_handed_out_and_is_then_starting(self, placed):
        job, allocation, agent = placed

        response = agent.get(NEXT)

        assert response.status_code == 200, response.content
        body = response.json()
        assert body["allocation_id"] == str(allocation.pk)
        assert body["job"]["id"] == str(job.pk)
        assert body["job"]["image"] == job.image
        assert body["job"]["command"] == job.command
        assert body["job"]["gpu_count"] == 1
        assert body["job"]["interruptible"] is False  # on demand: its GPU is not advertised while it runs
        whole = {"index": 0, "uuid": "GPU-shed-0", "gpu_uuid": "GPU-shed-0", "kind": "whole", "share": 0}
        assert body["gpus"] == [whole]
        assert body["price_per_gpu_hour_micros"] == allocation.price_per_gpu_hour_micros
        assert Job.objects.get(pk=job.pk).state == Job.State.STARTING
        assert Allocation.objects.get(pk=allocation.pk).acknowledged_at is not None

    def test_a_second_pull_does_not_hand_it_out_again(self, placed):
        _, _, agent = placed
        agent.get(NEXT)

        assert agent.get(NEXT).status_code == 204

    def test_another_units_job_is_not_handed_out(self, placed, owner):
        _, allocation, _ = placed
        _, other_credential = unit_online(owner, name="other", gpus=2)

        assert agent_client(other_credential).get(NEXT).status_code == 204
        assert Allocation.objects.get(pk=allocation.pk).acknowledged_at is None

    def test_a_long_poll_hands_out_a_job_placed_while_it_waits(self, shed, renter, monkeypatch):
        unit, agent = shed
        monkeypatch.setattr(use_cases, "POLL_INTERVAL_S", 0.01)
        looks, real = [], use_cases.agent_assignment_waiting

        def look(*, unit):
            looks.append(unit.pk)
            if len(looks) == 3:
                job_place(job_id=job_make(renter).pk)
            return real(unit=unit)

        monkeypatch.setattr(use_cases, "agent_assignment_waiting", look)
        response = agent.get(NEXT, {"wait": 20})

        assert response.status_code == 200 and len(looks) == 3
        assert cache.get(f"long-poll:unit:{unit.pk}:0") is None  # its slot is given back

    def test_a_unit_beyond_its_wait_cap_is_answered_at_once(self, shed, settings, monkeypatch):
        unit, agent = shed
        settings.LONG_POLL_WAITS_PER_UNIT = 1
        assert longpoll.wait_slots_take({f"unit:{unit.pk}": 1}, seconds=30) is not None  # one wait in flight
        looks = []
        monkeypatch.setattr(use_cases, "agent_assignment_waiting", lambda *, unit: looks.append(1))

        assert agent.get(NEXT, {"wait": 20}).status_code == 204
        assert looks == [1]  # one look, no waiting

    @pytest.mark.parametrize("wait", ["x", "-1", "61", "1e3", "9" * 30])
    def test_a_wait_out_of_bounds_is_a_400(self, shed, wait):
        _, agent = shed
        assert "wait" in problem_of(agent.get(NEXT, {"wait": wait}), 400)["errors"]

    def test_start_makes_the_job_running(self, placed):
        job, allocation, agent = placed
        agent.get(NEXT)

        response = agent.post(start_url(allocation))

        assert response.status_code == 200
        assert response.json() == {"state": "running"}
        job.refresh_from_db()
        assert job.state == Job.State.RUNNING
        assert job.started_at is not None

    def test_starting_twice_is_a_conflict(self, running):
        job, allocation, agent = running

        problem_of(agent.post(start_url(allocation)), 409)

        assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING

    def test_a_cancelled_job_cannot_start(self, placed):
        job, allocation, agent = placed
        agent.get(NEXT)
        job_cancel(job=job, actor="test")

        problem_of(agent.post(start_url(allocation)), 409)

        assert Job.objects.get(pk=job.pk).state == Job.State.CANCELLED


class TestUsage:
    def test_samples_are_accepted(self, running):
        _, allocation, agent = running

        response = agent.post(usage_url(allocation), {"samples": [sample(1), sample(2)]}, format="json")

        assert response.status_code == 200, response.content
        assert response.json() == {"accepted": 2, "duplicates": 0}
        assert sorted(UsageSample.objects.filter(allocation=allocation).values_list("seq", flat=True)) == [1, 2]

    def test_the_same_sample_twice_is_counted_once(self, running):
        _, allocation, agent = running
        agent.post(usage_url(allocation), {"samples": [sample(1, 500)]}, format="json")

        again = agent.post(usage_url(allocation), {"samples": [sample(1, 500), sample(2, 700)]}, format="json")

        assert again.json() == {"accepted": 1, "duplicates": 1}
        assert list(UsageSample.objects.filter(allocation=allocation).values_list("seq", "gpu_ms")) == [
            (1, 500),
            (2, 700),
        ]

    def test_a_sample_repeated_within_one_report_is_counted_once(self, running):
        _, allocation, agent = running

        response = agent.post(usage_url(allocation), {"samples": [sample(3), sample(3)]}, format="json")

        assert response.json() == {"accepted": 1, "duplicates": 1}
        assert UsageSample.objects.filter(allocation=allocation).count() == 1

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param({"samples": []}, id="empty"),
            pytest.param({"samples": [{"seq": 0, "gpu_ms": 1, "recorded_at": "2026-01-01T00:00:00Z"}]}, id="seq-0"),
            pytest.param({"samples": [{"seq": 1, "gpu_ms": -1, "recorded_at": "2026-01-01T00:00:00Z"}]}, id="neg"),
            pytest.param({"samples": [{"seq": 1, "gpu_ms": 1}]}, id="no-time"),
            pytest.param({"samples": [sample(1)], "extra": 1}, id="unknown-field"),
        ],
    )
    def test_malformed_samples_are_refused_with_400(self, running, payload):
        _, allocation, agent = running

        problem_of(agent.post(usage_url(allocation), payload, format="json"), 400)

        assert not UsageSample.objects.filter(allocation=allocation).exists()


class TestFinish:
    def test_exit_zero_succeeds_and_frees_the_gpus(self, running):
        job, allocation, agent = running

        response = agent.post(finish_url(allocation), {"exit_code": 0}, format="json")

        assert response.status_code == 200, response.content
        assert response.json() == {"state": "succeeded"}
        job.refresh_from_db()
        assert job.state == Job.State.SUCCEEDED
        assert job.exit_code == 0
        assert job.finished_at is not None
        allocation.refresh_from_db()
        assert allocation.released_at is not None
        assert not allocation.leases.filter(released_at__isnull=True).exists()

    def test_a_non_zero_exit_fails_with_a_reason(self, running):
        job, allocation, agent = running

        response = agent.post(finish_url(allocation), {"exit_code": 3}, format="json")

        assert response.json() == {"state": "failed"}
        job.refresh_from_db()
        assert job.state == Job.State.FAILED
        assert job.exit_code == 3
        assert job.failure_reason == "exit code 3"
        assert not allocation.leases.filter(released_at__isnull=True).exists()

    def test_a_job_that_never_started_fails_with_the_agents_reason(self, placed):
        job, allocation, agent = placed
        agent.get(NEXT)

        agent.post(finish_url(allocation), {"exit_code": None, "reason": "image_pull_failed"}, format="json")

        job.refresh_from_db()
        assert job.state == Job.State.FAILED
        assert job.failure_reason == "image_pull_failed"

    def test_finishing_twice_changes_nothing(self, running):
        job, allocation, agent = running
        agent.post(finish_url(allocation), {"exit_code": 0}, format="json")

        again = agent.post(finish_url(allocation), {"exit_code": 1}, format="json")

        assert again.json() == {"state": "succeeded"}
        job.refresh_from_db()
        assert (job.state, job.exit_code) == (Job.State.SUCCEEDED, 0)

    def test_the_freed_gpu_can_be_placed_again(self, running, renter):
        _, allocation, agent = running
        agent.post(finish_url(allocation), {"exit_code": 0}, format="json")
        second = job_make(renter, gpu_count=2)

        assert job_place(job_id=second.pk) is not None

    def test_a_malformed_finish_is_refused_with_400(self, running):
        job, allocation, agent = running

        problem_of(agent.post(finish_url(allocation), {"exit_code": "zero"}, format="json"), 400)

        assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING


class TestAnotherUnitsAllocation:
    """An agent may act only on its own unit's allocations; another unit's look like none at all."""

    @pytest.fixture
    def intruder(self, owner):
        _, credential = unit_online(owner, name="intruder", gpus=2)
        return agent_client(credential)

    def test_start_is_a_404(self, placed, intruder):
        job, allocation, agent = placed
        agent.get(NEXT)

        problem_of(intruder.post(start_url(allocation)), 404)

        assert Job.objects.get(pk=job.pk).state == Job.State.STARTING

    def test_usage_is_a_404(self, running, intruder):
        _, allocation, _ = running

        problem_of(intruder.post(usage_url(allocation), {"samples": [sample(1)]}, format="json"), 404)

        assert not UsageSample.objects.filter(allocation=allocation).exists()

    def test_finish_is_a_404(self, running, intruder):
        job, allocation, _ = running

        problem_of(intruder.post(finish_url(allocation), {"exit_code": 1}, format="json"), 404)

        assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING
        allocation.refresh_from_db()
        assert allocation.released_at is None
        assert allocation.leases.filter(released_at__isnull=True).count() == 1

    def test_an_unknown_allocation_is_a_404(self, shed):
        _, agent = shed

        problem_of(agent.post(f"{AGENT}/allocations/00000000-0000-0000-0000-000000000000/start"), 404)


class TestCredentials:
    def test_a_renter_api_key_is_refused_on_agent_endpoints(self, shed, renter):
        unit, _ = shed
        renter_api = renter_client(renter)
        before = Unit.objects.get(pk=unit.pk).last_heartbeat_at

        problem_of(renter_api.post(HEARTBEAT, {"gpus": report(2)}, format="json"), 401)
        problem_of(renter_api.get(NEXT), 401)
        assert Unit.objects.get(pk=unit.pk).last_heartbeat_at == before

    def test_a_node_credential_is_refused_on_renter_endpoints(self, owner):
        _, credential = unit_online(owner, name="shed", gpus=1)
        agent = agent_client(credential)

        problem_of(agent.get("/api/v1/jobs"), 401)
        problem_of(agent.post("/api/v1/jobs", {"image": "x", "command": ["y"]}, format="json"), 401)
        problem_of(agent.get("/api/v1/balance"), 401)
        assert not Job.objects.exists()

    @pytest.mark.parametrize(
        "header", ["", "Bearer shs_node_abcdef123456_nope", "Bearer nonsense", "Basic Zm9vOmJhcg=="]
    )
    def test_a_missing_or_unknown_credential_is_refused(self, shed, header):
        client = APIClient()
        if header:
            client.credentials(HTTP_AUTHORIZATION=header)

        problem_of(client.post(HEARTBEAT, {"gpus": []}, format="json"), 401)

    def test_a_retired_units_credential_is_refused(self, shed):
        unit, agent = shed
        Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.RETIRED)

        problem_of(agent.post(HEARTBEAT, {"gpus": report(2)}, format="json"), 401)


class TestCancellation:
    def test_a_cancelled_running_job_is_in_the_heartbeats_cancel_list(self, running):
        job, allocation, agent = running
        job_cancel(job=job, actor="test")

        response = agent.post(HEARTBEAT, {"gpus": report(2), "running": [str(allocation.pk)]}, format="json")

        assert response.json()["cancel"] == [str(allocation.pk)]
        # The GPU stays leased until the agent confirms the process has stopped.
        assert allocation.leases.filter(released_at__isnull=True).count() == 1

    def test_a_running_job_is_not_in_the_cancel_list(self, running):
        _, allocation, agent = running

        response = agent.post(HEARTBEAT, {"gpus": report(2), "running": [str(allocation.pk)]}, format="json")

        assert response.json()["cancel"] == []

    def test_finishing_a_cancelled_job_frees_its_gpu_and_keeps_it_cancelled(self, running):
        job, allocation, agent = running
        job_cancel(job=job, actor="test")

        response = agent.post(finish_url(allocation), {"exit_code": 137, "reason": "cancelled"}, format="json")

        assert response.json() == {"state": "cancelled"}
        job.refresh_from_db()
        assert job.state == Job.State.CANCELLED
        assert job.exit_code == 137
        assert not allocation.leases.filter(released_at__isnull=True).exists()

    def test_a_job_cancelled_before_the_pull_is_never_handed_out(self, placed):
        job, allocation, agent = placed
        job_cancel(job=job, actor="test")

        assert agent.get(NEXT).status_code == 204
        assert not allocation.leases.filter(released_at__isnull=True).exists()
