"""The renter's jobs page and the owner's earnings page show only the caller's own money."""

from datetime import UTC, datetime

import pytest

from billing.services import SampleReport, usage_post, usage_record
from marketplace.placement import job_place
from tests.conftest import job_make, unit_online

pytestmark = pytest.mark.django_db


def ran_for(job, *, gpu_ms: int):
    allocation = job_place(job_id=job.pk)
    usage_record(allocation=allocation, samples=[SampleReport(seq=1, gpu_ms=gpu_ms, recorded_at=datetime.now(UTC))])
    usage_post(allocation_id=allocation.pk)
    return allocation


@pytest.fixture
def one_hour_at_two_dollars(owner, renter):
    unit_online(owner, name="garden", price_per_gpu_hour_micros=2_000_000)
    return ran_for(job_make(renter, name="train-llm"), gpu_ms=3_600_000)


def test_a_renter_sees_their_job_with_its_cost_and_their_balance(client, renter, one_hour_at_two_dollars):
    client.force_login(renter)
    page = client.get("/portal/jobs/").content.decode()
    assert "train-llm" in page
    assert "2.00" in page  # the job's cost
    assert "-2.00 USD" in page  # no top-up yet, so the wallet is two dollars short


def test_a_renter_does_not_see_another_renters_jobs(client, stranger, one_hour_at_two_dollars):
    client.force_login(stranger)
    page = client.get("/portal/jobs/").content.decode()
    assert "train-llm" not in page
    assert "No jobs yet" in page


def test_an_owner_sees_what_their_unit_earned_after_the_platform_fee(client, owner, one_hour_at_two_dollars, settings):
    client.force_login(owner)
    page = client.get("/portal/earnings/").content.decode()
    owed = 2_000_000 - 2_000_000 * settings.PLATFORM_FEE_PERCENT // 100
    assert f"{owed / 1_000_000:.2f} USD" in page
    assert "garden" in page


def test_an_owner_does_not_see_another_owners_earnings(client, stranger, one_hour_at_two_dollars):
    client.force_login(stranger)
    page = client.get("/portal/earnings/").content.decode()
    assert "garden" not in page
    assert "0.00 USD" in page


@pytest.mark.parametrize("path", ["/portal/jobs/", "/portal/earnings/"])
def test_money_pages_need_a_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]


def test_a_queued_job_says_in_words_why_it_waits(client, owner, renter):
    from marketplace.models import Job

    unit_online(owner, name="lyon", country="FR")
    unit_online(owner, name="munich", country="DE", price_per_gpu_hour_micros=9_000_000)
    job = job_make(renter, name="needs-de-cheap", jurisdictions=["DE"], max_price_per_gpu_hour_micros=1_000_000)
    assert job_place(job_id=job.pk) is None
    assert Job.objects.get(pk=job.pk).pending_reason["units_considered"] == 2
    client.force_login(renter)

    page = client.get("/portal/jobs/").content.decode()

    assert "0 of 2 units fit: 1 outside the allowed jurisdictions, 1 above the price cap" in page
