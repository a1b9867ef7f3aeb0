import json

import httpx
import pytest

from nodes.agent import client as agent_client
from nodes.agent.client import (
    AgentClient,
    AuthError,
    BadRequest,
    Conflict,
    NotFound,
    RateLimited,
    ServerError,
    Unreachable,
)
from tests.agent.fakes import problem

ALLOCATION = "5f0c9a4e-1b2d-4c3e-8f6a-7b8c9d0e1f2a"


def answering(response: httpx.Response, seen: list | None = None) -> AgentClient:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return response

    return AgentClient("http://shed.test/", "shs_node_x", transport=httpx.MockTransport(handle))


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequest),
        (401, AuthError),
        (403, AuthError),
        (404, NotFound),
        (409, Conflict),
        (422, BadRequest),
        (429, RateLimited),
        (500, ServerError),
        (502, ServerError),
        (503, RateLimited),
    ],
)
def test_each_http_status_becomes_its_own_error_with_the_problem_detail(status, error):
    client = answering(problem(status, "Something specific went wrong."))

    with pytest.raises(error, match="Something specific went wrong") as raised:
        client.start(ALLOCATION)

    assert raised.value.status == status
    assert f"POST /allocations/{ALLOCATION}/start: {status}" in str(raised.value)


def test_field_errors_are_part_of_the_message():
    body = {"title": "Invalid input", "status": 400, "detail": "Invalid input.",
            "errors": {"samples": ["This list may not be empty."]}}  # fmt: skip

    with pytest.raises(BadRequest, match="may not be empty"):
        answering(httpx.Response(400, json=body)).usage(ALLOCATION, [])


def test_a_non_json_error_still_reads_well():
    with pytest.raises(ServerError, match="502 Bad Gateway"):
        answering(httpx.Response(502, text="<html>nginx</html>")).start(ALLOCATION)


@pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("0.5", 0.5), ("soon", 0.0)])
def test_rate_limits_carry_the_servers_retry_after(header, seconds):
    client = answering(httpx.Response(429, headers={"Retry-After": header}))

    with pytest.raises(RateLimited) as raised:
        client.next_assignment(wait_s=1)

    assert raised.value.retry_after == seconds


@pytest.mark.parametrize(
    "failure", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("eof")]
)
def test_no_answer_at_all_is_unreachable(failure):
    def handle(request: httpx.Request) -> httpx.Response:
        raise failure

    client = AgentClient("http://shed.test", "shs_node_x", transport=httpx.MockTransport(handle))

    with pytest.raises(Unreachable) as raised:
        client.heartbeat(gpus=[], running=[])

    assert raised.value.retryable
    assert raised.value.status is None


def test_only_transient_failures_are_retryable():
    assert [e.retryable for e in (NotFound, Conflict, BadRequest)] == [False] * 3
    assert [e.retryable for e in (Unreachable, RateLimited, ServerError, AuthError)] == [True] * 4


def test_calls_carry_the_credential_and_the_agent_version():
    seen: list[httpx.Request] = []
    reply = {"status": "online", "heartbeat_interval_s": 5, "cancel": []}

    answering(httpx.Response(200, json=reply), seen).heartbeat(gpus=[{"index": 0}], running=["a"])

    request = seen[0]
    assert request.url == "http://shed.test/api/agent/v1/heartbeat"
    assert request.headers["Authorization"] == "Bearer shs_node_x"
    assert request.headers["User-Agent"] == f"shedshare-agent/{agent_client.__version__}"
    assert json.loads(request.content) == {"gpus": [{"index": 0}], "running": ["a"], "agent_version": "0.1.0"}


def test_no_work_is_none_and_the_long_poll_outlasts_its_wait():
    seen: list[httpx.Request] = []

    assert answering(httpx.Response(204), seen).next_assignment(wait_s=20) is None
    assert seen[0].url.params["wait"] == "20"
    assert seen[0].extensions["timeout"]["read"] > 20


def test_usage_and_finish_send_the_contract_bodies():
    seen: list[httpx.Request] = []
    client = answering(httpx.Response(200, json={"accepted": 1, "duplicates": 0}), seen)
    sample = {"seq": 1, "gpu_ms": 2000, "recorded_at": "2025-01-01T00:00:00.000Z"}

    assert client.usage(ALLOCATION, [sample]) == {"accepted": 1, "duplicates": 0}
    client.finish(ALLOCATION, exit_code=None, reason="start_failed")

    assert json.loads(seen[0].content) == {"samples": [sample]}
    assert json.loads(seen[1].content) == {"exit_code": None, "reason": "start_failed"}
    assert seen[1].url.path == f"/api/agent/v1/allocations/{ALLOCATION}/finish"


def test_enrolment_sends_no_credential_and_returns_the_new_one():
    seen: list[httpx.Request] = []
    reply = {"unit_id": "u-1", "credential": "shs_node_new", "heartbeat_interval_s": 5}

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json=reply)

    enrolment = AgentClient("http://shed.test", transport=httpx.MockTransport(handle)).enrol(
        token="shs_enrol_abc", hostname="shed-1"
    )

    assert (enrolment.unit_id, enrolment.credential) == ("u-1", "shs_node_new")
    assert "Authorization" not in seen[0].headers
    assert json.loads(seen[0].content) == {
        "token": "shs_enrol_abc", "hostname": "shed-1", "agent_version": "0.1.0"
    }  # fmt: skip


def test_a_malformed_enrolment_answer_is_a_server_error():
    with pytest.raises(ServerError, match="malformed"):
        answering(httpx.Response(201, json={"unit_id": "u-1"})).enrol(token="t", hostname="h")
