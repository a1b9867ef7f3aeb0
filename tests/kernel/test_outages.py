"""An outage of the database, broker or cache answers 503 with Retry-After, never 500: as a
problem on the renter and agent APIs, as a short page on the portal (marketplace/kernel/outages.py)."""

from dataclasses import asdict
from unittest import mock

import pytest
from django.db import OperationalError
from django.test import Client
from kombu.exceptions import OperationalError as BrokerError

from tests.conftest import agent_client, gpus_make, problem_of, unit_online

DATABASE_DOWN = OperationalError('connection to server at "127.0.0.1", port 5432 failed: Connection refused')
BROKER_DOWN = BrokerError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


@pytest.mark.parametrize("error", [DATABASE_DOWN, BROKER_DOWN], ids=["database", "broker"])
@pytest.mark.django_db
def test_the_renter_api_answers_503_with_retry_after(renter_api, error, settings):
    settings.OUTAGE_RETRY_AFTER_S = 7
    with mock.patch("billing.api.views.wallet_balance_micros", side_effect=error):
        response = renter_api.get("/api/v1/balance")

    body = problem_of(response, 503)
    assert body["type"] == "/problems/service-unavailable"
    assert response["Retry-After"] == "7"


@pytest.mark.django_db
def test_the_agent_api_answers_503_so_the_agent_backs_off(owner):
    _, credential = unit_online(owner, gpus=1)
    beat = {"gpus": [asdict(gpu) for gpu in gpus_make(1)]}
    with mock.patch("marketplace.jobs.agent_use_cases.agent_heartbeat", side_effect=DATABASE_DOWN):
        response = agent_client(credential).post("/api/agent/v1/heartbeat", beat, format="json")

    problem_of(response, 503)
    assert int(response["Retry-After"]) > 0


@pytest.mark.django_db
def test_the_portal_shows_a_page_that_needs_no_database(owner):
    portal = Client()
    portal.force_login(owner)
    with mock.patch("nodes.views.selectors.units_for", side_effect=DATABASE_DOWN):
        response = portal.get("/portal/units/")

    assert response.status_code == 503 and response["Retry-After"]
    assert b"briefly unavailable" in response.content


@pytest.mark.django_db
def test_an_outage_outside_any_view_is_a_503_too(owner):
    """The session is read in a middleware, before any view: Django's handler500 answers there."""
    portal = Client(raise_request_exception=False)
    portal.force_login(owner)
    with mock.patch("django.contrib.sessions.backends.db.SessionStore.load", side_effect=DATABASE_DOWN):
        response = portal.get("/portal/units/")

    assert response.status_code == 503 and response["Retry-After"]


@pytest.mark.django_db
def test_other_errors_are_still_a_500(renter_api):
    api = renter_api
    api.raise_request_exception = False
    with mock.patch("billing.api.views.wallet_balance_micros", side_effect=RuntimeError("a bug")):
        response = api.get("/api/v1/balance")

    assert response.status_code == 500
