"""The agent protocol is written once (nodes/agent/protocol.py): the server's choices and URLs
and the agent's client are built from it."""

import httpx
from django.urls import reverse

from nodes.agent import protocol
from nodes.agent.client import AgentClient
from nodes.models import Isolation, Slice, Slicing, WorkloadClass

ALLOCATION = "0b7c6a52-3c4e-4d0e-9a43-1f1f8e0a2b11"


def test_model_choices_are_the_protocol_values_in_its_order():
    assert tuple(Isolation.values) == protocol.ISOLATION_LEVELS
    assert tuple(Slicing.values) == protocol.SLICE_KINDS
    assert tuple(Slice.Kind.values) == protocol.SLICE_KINDS
    assert tuple(WorkloadClass.values) == protocol.WORKLOAD_CLASSES


def test_isolation_rank_follows_the_protocol_order():
    ranks = [Isolation.rank(level) for level in protocol.ISOLATION_LEVELS]
    assert ranks == sorted(ranks) == list(range(len(protocol.ISOLATION_LEVELS)))


def test_refusals_share_the_prefix():
    refusals = [value for name, value in vars(protocol.Refused).items() if not name.startswith("_")]
    assert refusals and all(reason.startswith(protocol.REFUSED) for reason in refusals)
    assert protocol.REFUSED_FOR_LIMITS in refusals


def test_server_urls_are_the_protocol_paths():
    prefix = protocol.API_PREFIX
    assert reverse("agent:enrol") == f"{prefix}/{protocol.ENROL}"
    assert reverse("agent:heartbeat") == f"{prefix}/{protocol.HEARTBEAT}"
    assert reverse("agent:assignment-next") == f"{prefix}/{protocol.NEXT_ASSIGNMENT}"
    for action in protocol.ALLOCATION_ACTIONS:
        url = reverse(f"agent:allocation-{action}", args=[ALLOCATION])
        assert url == f"{prefix}/{protocol.allocation_path(ALLOCATION, action)}"


def test_the_agent_client_calls_the_protocol_paths():
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.endswith(protocol.NEXT_ASSIGNMENT):
            return httpx.Response(204)
        return httpx.Response(200, json={"unit_id": "u", "credential": "c", "accepted": 1, "duplicates": 0})

    with AgentClient("http://shed.test", "secret", transport=httpx.MockTransport(answer)) as client:
        client.enrol(token="t", hostname="h")
        client.heartbeat(gpus=[], running=[])
        client.next_assignment(wait_s=0)
        client.start(ALLOCATION)
        client.usage(ALLOCATION, [])
        client.logs(ALLOCATION, offset=0, data="")
        client.finish(ALLOCATION, exit_code=0, reason=protocol.Finish.EXITED)
        client.secrets(ALLOCATION)
        client.staging(ALLOCATION, {"phase": "in", "ok": True, "reason": "", "detail": "", "files": [], "seconds": 0})

    prefix = protocol.API_PREFIX
    expected = [f"{prefix}/{protocol.ENROL}", f"{prefix}/{protocol.HEARTBEAT}", f"{prefix}/{protocol.NEXT_ASSIGNMENT}"]
    expected += [f"{prefix}/{protocol.allocation_path(ALLOCATION, a)}" for a in protocol.ALLOCATION_ACTIONS]
    assert seen == expected
