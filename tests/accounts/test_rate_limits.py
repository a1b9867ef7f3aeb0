"""Per-renter rate limits: a 429 problem with Retry-After, counted per account (all its keys), tighter for submits."""

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from marketplace.jobs.models import Job
from tests.conftest import JOB_SPEC, problem_of, renter_client

JOBS = "/api/v1/jobs"
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def low_rates(settings):
    settings.API_RATE_LIMIT = "3/min"
    settings.API_SUBMIT_RATE_LIMIT = "2/min"
    cache.clear()
    yield
    cache.clear()


def test_the_request_over_the_limit_is_a_429_problem_with_retry_after(renter_api):
    assert [renter_api.get(JOBS).status_code for _ in range(3)] == [200, 200, 200]

    response = renter_api.get(JOBS)

    body = problem_of(response, 429)
    assert body["type"] == "/problems/throttled"
    # A sliding minute, approximated from two fixed ones: the wait can reach into the next minute.
    assert 1 <= int(response["Retry-After"]) <= 120


def test_a_renters_keys_share_one_budget_so_more_keys_do_not_raise_it(renter, renter_api, stranger_api):
    for _ in range(3):
        renter_api.get(JOBS)
    assert renter_api.get(JOBS).status_code == 429

    assert renter_client(renter).get(JOBS).status_code == 429
    assert stranger_api.get(JOBS).status_code == 200


def test_session_logins_are_counted_per_user(renter, stranger):
    renter_web, stranger_web = APIClient(), APIClient()
    renter_web.force_login(renter)
    stranger_web.force_login(stranger)
    for _ in range(3):
        renter_web.get(JOBS)

    assert renter_web.get(JOBS).status_code == 429
    assert stranger_web.get(JOBS).status_code == 200


def test_submits_have_a_tighter_limit_of_their_own(renter_api):
    assert [renter_api.post(JOBS, JOB_SPEC, format="json").status_code for _ in range(3)] == [201, 201, 429]
    assert Job.objects.count() == 2


def test_the_default_rates_come_from_settings(settings, renter_api):
    settings.API_RATE_LIMIT = "100/min"

    assert [renter_api.get(JOBS).status_code for _ in range(5)] == [200] * 5
