"""Agent calls are limited per unit (not per address), heartbeats on a budget of their own, and
failed enrolments lock an address out for a while."""

import pytest
from rest_framework.test import APIClient

from marketplace.jobs.agent_stream import calls
from marketplace.kernel.ratelimit import Rate
from nodes.agent.loop import Options
from nodes.agent.reports import Reporter
from nodes.services import unit_register
from tests.conftest import agent_client, problem_of, unit_online
from tests.nodes.test_enrolment import ENROL, HEARTBEAT

ASSIGNMENT = "/api/agent/v1/assignments/next"
pytestmark = pytest.mark.django_db


def beat(client):
    return client.post(HEARTBEAT, {"gpus": [], "running": []}, format="json")


def enrol(token: str, *, address: str = "203.0.113.9"):
    body = {"token": token, "hostname": "shed.local", "agent_version": "1.0"}
    return APIClient().post(ENROL, body, format="json", REMOTE_ADDR=address)


class TestPerUnit:
    def test_a_unit_over_its_limit_gets_a_429_problem_with_retry_after(self, owner, settings):
        settings.AGENT_RATE_LIMIT = "3/min"
        _, credential = unit_online(owner)
        client = agent_client(credential)
        assert [client.get(ASSIGNMENT).status_code for _ in range(3)] == [204] * 3

        response = client.get(ASSIGNMENT)

        body = problem_of(response, 429)
        assert body["type"] == "/problems/throttled"
        assert int(response["Retry-After"]) >= 1

    def test_units_behind_one_address_are_counted_apart(self, owner, settings):
        settings.AGENT_RATE_LIMIT = "3/min"
        _, first = unit_online(owner, name="first")
        _, second = unit_online(owner, name="second")
        for _ in range(3):
            agent_client(first).get(ASSIGNMENT, REMOTE_ADDR="192.0.2.1")

        assert (
            agent_client(first).get(ASSIGNMENT, REMOTE_ADDR="192.0.2.2").status_code == 429
        )  # a new address: same unit
        assert agent_client(second).get(ASSIGNMENT, REMOTE_ADDR="192.0.2.1").status_code == 204

    def test_reports_cannot_use_up_the_heartbeats_budget(self, owner, settings):
        settings.AGENT_RATE_LIMIT = "2/min"
        settings.AGENT_HEARTBEAT_RATE_LIMIT = "2/min"
        _, credential = unit_online(owner)
        client = agent_client(credential)
        for _ in range(3):
            client.get(ASSIGNMENT)

        assert [beat(client).status_code for _ in range(3)] == [200, 200, 429]

    @pytest.mark.django_db(transaction=True)  # a call opens and closes the thread's connection, as a request does
    def test_stream_calls_are_left_to_the_streams_budget_but_full_heartbeats_are_counted(self, owner, settings):
        settings.AGENT_RATE_LIMIT = "2/min"
        settings.AGENT_HEARTBEAT_RATE_LIMIT = "2/min"
        _, credential = unit_online(owner)
        headers = [(b"host", b"testserver"), (b"authorization", f"Bearer {credential}".encode())]
        environ = calls.environ_base({"headers": headers})
        missing = "allocations/00000000-0000-0000-0000-000000000000/start"
        # Reports over the stream: the stream's frame budget bounds them, not AGENT_RATE_LIMIT.
        assert [calls.call(environ, "POST", missing, {})[0] for _ in range(4)] == [404] * 4
        assert [calls.call(environ, "POST", "heartbeat", {"gpus": []})[0] for _ in range(3)] == [200, 200, 429]
        # Over HTTP the same unit's budget is untouched by the stream's calls.
        assert [agent_client(credential).get(ASSIGNMENT).status_code for _ in range(3)] == [204, 204, 429]

    def test_a_client_cannot_claim_its_http_call_came_over_a_stream(self, owner, settings):
        settings.AGENT_RATE_LIMIT = "2/min"
        _, credential = unit_online(owner)
        client = agent_client(credential)
        header = {"HTTP_SHEDSHARE.STREAM_CALL": "1", "HTTP_SHEDSHARE_STREAM_CALL": "1"}
        assert [client.get(ASSIGNMENT, **header).status_code for _ in range(3)] == [204, 204, 429]


def per_minute(setting: str) -> float:
    rate = Rate.parse(setting)
    return rate.count * 60 / rate.period_s


def test_the_default_limits_sit_above_what_an_honest_agent_sends(settings):
    """The agent's own pace, read from its code: a heartbeat every HEARTBEAT_INTERVAL_S (1 s in
    the end-to-end stack), a poll at most every poll_wait_s, and at most ``flush``'s calls per
    tick while catching up on reports."""
    options = Options()
    fastest_heartbeat_s = 1
    heartbeats_per_min = 60 / fastest_heartbeat_s
    report_calls = Reporter.flush.__defaults__[0]
    calls_per_min = 60 / options.tick_s * report_calls + 60 / options.poll_wait_s

    assert per_minute(settings.AGENT_HEARTBEAT_RATE_LIMIT) >= 2 * heartbeats_per_min
    assert per_minute(settings.AGENT_RATE_LIMIT) >= calls_per_min


class TestEnrolmentLockout:
    def test_failed_enrolments_lock_the_address_out_with_a_429_problem(self, owner, settings):
        settings.ENROL_FAILURE_LIMIT = "5/hour"
        _, token = unit_register(owner=owner, name="Garden shed", country="DE")
        assert {enrol(f"shs_enrol_guess{n}").status_code for n in range(5)} == {401}

        response = enrol(token)  # even the right token, from there, for now

        body = problem_of(response, 429)
        assert "failed enrolments" in body["detail"]
        assert int(response["Retry-After"]) >= 1
        assert enrol(token, address="198.51.100.7").status_code == 201  # another address is not locked

    def test_bad_bodies_count_as_failures(self, settings):
        settings.ENROL_FAILURE_LIMIT = "2/hour"
        client = APIClient()
        for _ in range(2):
            assert client.post(ENROL, {"token": ["not", "a", "string"]}, format="json").status_code == 400

        problem_of(client.post(ENROL, {"token": ["not", "a", "string"]}, format="json"), 429)

    def test_successful_enrolments_do_not_count(self, owner, settings):
        settings.ENROL_FAILURE_LIMIT = "2/hour"
        for n in range(4):
            _, token = unit_register(owner=owner, name=f"shed {n}", country="DE")
            assert enrol(token).status_code == 201

    def test_the_answer_with_the_credential_may_not_be_stored(self, owner):
        _, token = unit_register(owner=owner, name="Garden shed", country="DE")

        response = enrol(token)

        assert response.status_code == 201
        assert response["Cache-Control"] == "no-store"
