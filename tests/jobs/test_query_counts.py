"""Query counts pinned on the hot paths, so an N+1 fails here before it slows production."""

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.services import usage_post
from marketplace.jobs.placement import job_place
from marketplace.jobs.usage import SampleReport, usage_record
from tests.conftest import allocation_since, job_make, unit_online

JOBS = "/api/v1/jobs"
AT = datetime(2026, 1, 1, tzinfo=UTC)

# The API key lookup, the page count, the jobs and one prefetch of their allocations.
JOB_LIST_QUERIES = 4


def jobs_with_history(renter, owner, count: int) -> None:
    """`count` jobs, each placed on a unit and charged for some usage."""
    unit_online(owner, name=f"shed-{count}", gpus=count)
    for i in range(count):
        job = job_make(renter)
        allocation = allocation_since(job_place(job_id=job.pk), AT - timedelta(days=1))
        usage_record(allocation=allocation, samples=[SampleReport(seq=1, gpu_ms=60_000 * (i + 1), recorded_at=AT)])
        usage_post(allocation_id=allocation.pk)


def list_queries(client) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(JOBS)
    assert response.status_code == 200
    return len(captured)


@pytest.mark.parametrize("count", [1, 10])
def test_listing_jobs_takes_a_fixed_number_of_queries(renter, owner, renter_api, count, django_assert_max_num_queries):
    jobs_with_history(renter, owner, count)
    renter_api.get(JOBS)  # the first call also touches the key's last use

    with django_assert_max_num_queries(JOB_LIST_QUERIES):
        response = renter_api.get(JOBS)

    assert response.json()["count"] == count
    assert all(job["usage"]["cost"] != "0.000000" for job in response.json()["results"])


def test_listing_ten_jobs_costs_no_more_than_listing_one(renter, stranger, owner, renter_api, stranger_api):
    jobs_with_history(renter, owner, 1)
    jobs_with_history(stranger, owner, 10)
    renter_api.get(JOBS)
    stranger_api.get(JOBS)

    assert list_queries(stranger_api) == list_queries(renter_api)


def test_usage_in_the_list_matches_the_ledger(renter, owner, renter_api):
    jobs_with_history(renter, owner, 3)

    results = renter_api.get(JOBS).json()["results"]

    # Newest first: 3, 2 and 1 GPU-minutes at 2.000000 per GPU-hour.
    assert [job["usage"] for job in results] == [
        {"gpu_seconds": 180.0, "cost": "0.100000"},
        {"gpu_seconds": 120.0, "cost": "0.066666"},
        {"gpu_seconds": 60.0, "cost": "0.033333"},
    ]
