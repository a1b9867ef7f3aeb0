"""Usage is plausible or refused: an agent's samples are stored (and so billed) only while its
allocation is active or just released, recorded within the allocation's life, and never adding up
to more GPU time than the allocation had. Refusals are problem+json, audited against the unit,
and repeated implausible ones put the unit under review, out of placement."""

from datetime import datetime, timedelta

import pytest
from django.utils import timezone

from billing.models import LedgerTransaction
from marketplace.jobs.models import Allocation, UsageSample
from marketplace.jobs.placement import job_place
from marketplace.jobs.usage import SampleReport, UsageRefused, usage_record
from marketplace.kernel.models import AuditEvent
from nodes.models import Unit
from nodes.services import unit_review_clear
from tests.conftest import agent_client, allocation_since, job_make, problem_of, unit_online

AGENT = "/api/agent/v1"
HOUR_MS = 3_600_000


def usage_url(allocation) -> str:
    return f"{AGENT}/allocations/{allocation.pk}/usage"


def sample(seq: int, gpu_ms: int = 1000, at: datetime | None = None) -> dict:
    return {"seq": seq, "gpu_ms": gpu_ms, "recorded_at": (at or timezone.now()).isoformat()}


@pytest.fixture
def rules(settings):
    settings.USAGE_LATE_GRACE_S = 300
    settings.USAGE_CLOCK_SKEW_S = 120
    settings.USAGE_TOLERANCE_S = 30
    settings.USAGE_REVIEW_AFTER = 3
    settings.USAGE_REVIEW_WINDOW = timedelta(hours=1)
    return settings


@pytest.fixture
def shed(owner, rules):
    unit, credential = unit_online(owner, name="shed", gpus=2)
    return unit, agent_client(credential)


@pytest.fixture
def active(shed, renter):
    """A one-GPU job placed on the shed a minute ago, and the shed's agent."""
    unit, agent = shed
    allocation = job_place(job_id=job_make(renter).pk)
    assert allocation is not None and allocation.unit_id == unit.pk
    return allocation_since(allocation, timezone.now() - timedelta(minutes=1)), agent


def refused(response, status: int, rule: str) -> dict:
    body = problem_of(response, status)
    assert body["type"] == f"/problems/{rule}", body
    return body


def released(allocation: Allocation, ago: timedelta) -> Allocation:
    Allocation.objects.filter(pk=allocation.pk).update(released_at=timezone.now() - ago, release_reason="exited")
    allocation.refresh_from_db()
    return allocation


class TestPlausibleUsage:
    def test_an_honest_agents_samples_are_taken(self, active):
        allocation, agent = active
        batch = [sample(1, 20_000), sample(2, 20_000), sample(3, 20_000)]  # a minute of one GPU

        response = agent.post(usage_url(allocation), {"samples": batch}, format="json")

        assert response.json() == {"accepted": 3, "duplicates": 0}

    def test_buffered_usage_recorded_before_the_release_is_taken_within_the_grace(self, active):
        allocation, agent = active
        allocation = released(allocation, timedelta(seconds=10))
        before = allocation.released_at - timedelta(seconds=5)

        response = agent.post(usage_url(allocation), {"samples": [sample(1, 40_000, before)]}, format="json")

        assert response.json() == {"accepted": 1, "duplicates": 0}

    def test_a_sample_sent_again_after_everything_ended_is_still_a_harmless_duplicate(self, active):
        allocation, agent = active
        agent.post(usage_url(allocation), {"samples": [sample(1, 1000)]}, format="json")
        allocation = released(allocation, timedelta(hours=1))

        response = agent.post(usage_url(allocation), {"samples": [sample(1, 1000)]}, format="json")

        assert response.json() == {"accepted": 0, "duplicates": 1}
        assert not AuditEvent.objects.filter(action="unit.usage_refused").exists()


class TestImplausibleUsage:
    def test_ten_samples_of_64_gpu_hours_for_a_minute_of_one_gpu_are_refused_whole(self, active, renter):
        allocation, agent = active
        batch = [sample(seq, 64 * HOUR_MS) for seq in range(1, 11)]

        body = refused(
            agent.post(usage_url(allocation), {"samples": batch}, format="json"), 422, "usage-exceeds-gpu-time"
        )

        assert "more than the allocation's 1 GPU(s)" in body["detail"]
        assert not UsageSample.objects.filter(allocation=allocation).exists()
        assert not LedgerTransaction.objects.exists()  # nothing stored, nothing rated

    def test_the_total_counts_what_is_stored_already(self, active):
        allocation, agent = active
        assert agent.post(usage_url(allocation), {"samples": [sample(1, 60_000)]}, format="json").status_code == 200

        response = agent.post(usage_url(allocation), {"samples": [sample(2, 40_000), sample(3, 1)]}, format="json")

        refused(response, 422, "usage-exceeds-gpu-time")
        assert list(UsageSample.objects.filter(allocation=allocation).values_list("seq", flat=True)) == [1]

    def test_the_total_is_gpus_times_active_time_plus_the_tolerance(self, active, rules):
        allocation, _ = active
        fits = 90_000 - 1_000  # 60 s active (and counting) + 30 s of tolerance, a second to spare

        assert usage_record(allocation=allocation, samples=[SampleReport(1, fits, timezone.now())]) == (1, 0)
        with pytest.raises(UsageRefused):
            usage_record(allocation=allocation, samples=[SampleReport(2, 60_000, timezone.now())])

    @pytest.mark.parametrize(
        "recorded_at",
        ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "2026-01-01T00:00:00Z"],
    )
    def test_a_recorded_at_outside_the_allocations_life_is_refused(self, active, recorded_at):
        allocation, agent = active
        batch = [sample(1), {"seq": 2, "gpu_ms": 1, "recorded_at": recorded_at}]

        response = agent.post(usage_url(allocation), {"samples": batch}, format="json")

        body = refused(response, 422, "usage-recorded-outside-allocation")
        assert "Sample 2" in body["detail"]
        assert not UsageSample.objects.filter(allocation=allocation).exists()

    def test_a_time_no_calendar_can_hold_in_utc_is_a_400_not_a_500(self, active):
        allocation, agent = active
        batch = [{"seq": 1, "gpu_ms": 1, "recorded_at": "0001-01-01T00:00:00+01:00"}]

        problem_of(agent.post(usage_url(allocation), {"samples": batch}, format="json"), 400)

    def test_usage_recorded_after_the_release_is_refused(self, active):
        allocation, agent = active
        allocation = released(allocation, timedelta(seconds=200))

        response = agent.post(usage_url(allocation), {"samples": [sample(1)]}, format="json")

        refused(response, 409, "usage-after-release")

    def test_usage_for_an_allocation_released_before_the_grace_is_refused(self, active):
        allocation, agent = active
        allocation = released(allocation, timedelta(seconds=301))
        before = allocation.released_at - timedelta(seconds=5)

        response = agent.post(usage_url(allocation), {"samples": [sample(1, 1000, before)]}, format="json")

        refused(response, 409, "usage-allocation-ended")
        assert not UsageSample.objects.filter(allocation=allocation).exists()

    def test_every_refusal_is_audited_against_the_unit(self, active):
        allocation, agent = active

        agent.post(usage_url(allocation), {"samples": [sample(1, 64 * HOUR_MS)]}, format="json")

        event = AuditEvent.objects.get(action="unit.usage_refused")
        assert event.subject_id == allocation.unit_id
        assert event.actor == f"unit:{allocation.unit_id}"
        assert event.data["rule"] == "usage-exceeds-gpu-time"
        assert event.data["allocation"] == str(allocation.pk) and event.data["samples"] == 1


class TestReview:
    def implausible(self, allocation, agent, times: int) -> None:
        for n in range(times):
            response = agent.post(usage_url(allocation), {"samples": [sample(100 + n, 64 * HOUR_MS)]}, format="json")
            assert response.status_code == 422

    def test_repeated_implausible_reports_put_the_unit_under_review_and_out_of_placement(self, active, renter):
        allocation, agent = active
        self.implausible(allocation, agent, 2)
        assert Unit.objects.get(pk=allocation.unit_id).review_since is None

        self.implausible(allocation, agent, 1)

        unit = Unit.objects.get(pk=allocation.unit_id)
        assert unit.review_since is not None
        assert "3 implausible usage reports" in unit.review_reason
        assert AuditEvent.objects.filter(action="unit.review_started", subject_id=unit.pk).count() == 1
        job = job_make(renter)
        assert job_place(job_id=job.pk) is None
        job.refresh_from_db()
        assert job.pending_reason["rejected"] == {"unit_under_review": 1}

    def test_late_reports_do_not_count_towards_a_review(self, active):
        """An honest agent back from an outage the server gave its job up over meets these."""
        allocation, agent = active
        allocation = released(allocation, timedelta(hours=1))

        for n in range(5):
            agent.post(usage_url(allocation), {"samples": [sample(n + 1)]}, format="json")

        unit = Unit.objects.get(pk=allocation.unit_id)
        assert (unit.implausible_reports, unit.review_since) == (0, None)

    def test_reports_outside_the_window_start_the_count_afresh(self, active):
        allocation, agent = active
        self.implausible(allocation, agent, 2)
        Unit.objects.filter(pk=allocation.unit_id).update(implausible_since=timezone.now() - timedelta(hours=2))

        self.implausible(allocation, agent, 2)

        unit = Unit.objects.get(pk=allocation.unit_id)
        assert (unit.implausible_reports, unit.review_since) == (2, None)

    def test_a_unit_under_review_offers_nothing(self, active, renter_api):
        allocation, agent = active

        def offered() -> list[str]:
            return [offer["unit"] for offer in renter_api.get("/api/v1/offers").json()["results"]]

        assert offered() == ["shed"]
        self.implausible(allocation, agent, 3)
        assert offered() == []

    def test_staff_clearing_the_review_brings_the_unit_back_into_placement(self, active, renter, staff):
        allocation, agent = active
        self.implausible(allocation, agent, 3)
        unit = Unit.objects.get(pk=allocation.unit_id)

        assert unit_review_clear(unit=unit, actor=f"user:{staff.pk}") is True

        assert (unit.review_since, unit.review_reason, unit.implausible_reports) == (None, "", 0)
        assert AuditEvent.objects.filter(action="unit.review_cleared", subject_id=unit.pk).count() == 1
        assert job_place(job_id=job_make(renter).pk) is not None

    def test_the_admin_clears_a_review_through_the_service(self, active, client, staff):
        staff.is_superuser = True
        staff.save()
        allocation, agent = active
        self.implausible(allocation, agent, 3)
        client.force_login(staff)

        response = client.post(
            "/admin/nodes/unit/", {"action": "clear_review", "_selected_action": [str(allocation.unit_id)]}
        )

        assert response.status_code == 302
        assert Unit.objects.get(pk=allocation.unit_id).review_since is None
        assert AuditEvent.objects.get(action="unit.review_cleared").actor == f"user:{staff.pk}"

    def test_the_owner_sees_why_on_the_unit_page(self, active, client, owner):
        allocation, agent = active
        self.implausible(allocation, agent, 3)
        client.force_login(owner)

        page = client.get(f"/portal/units/{allocation.unit_id}/").content.decode()

        assert 'id="placement-holds"' in page
        assert "Under review since" in page and "implausible usage reports" in page


def test_the_recorded_at_bounds_hold_at_the_allocations_creation(active, rules):
    allocation, _ = active
    skew = timedelta(seconds=rules.USAGE_CLOCK_SKEW_S)
    just_inside = allocation.created_at - skew + timedelta(seconds=1)
    just_outside = allocation.created_at - skew - timedelta(seconds=1)

    assert usage_record(allocation=allocation, samples=[SampleReport(1, 1, just_inside)]) == (1, 0)
    with pytest.raises(UsageRefused) as refusal:
        usage_record(allocation=allocation, samples=[SampleReport(2, 1, just_outside)])
    assert refusal.value.rule.code == "usage-recorded-outside-allocation"
