import httpx

from nodes.agent.client import AgentClient
from nodes.agent.reports import Outbox, Reporter
from tests.agent.fakes import CREDENTIAL, FakeServer, problem

A, B = "5f0c9a4e-1b2d-4c3e-8f6a-7b8c9d0e1f2a", "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"


def sample(seq: int) -> dict:
    return {"seq": seq, "gpu_ms": 1000, "recorded_at": "2025-01-01T00:00:00.000Z"}


def reporter_for(server: FakeServer, handle=None) -> Reporter:
    client = AgentClient("http://shed.test", CREDENTIAL, transport=httpx.MockTransport(handle or server.handle))
    return Reporter(client, Outbox(), clock=lambda: 0.0)


def test_consecutive_samples_of_one_allocation_travel_in_one_call(server):
    reporter = reporter_for(server)
    for seq in (1, 2, 3):
        reporter.usage(A, sample(seq))
    reporter.finish(A, 0, "exited")
    reporter.usage(B, sample(1))

    reporter.flush()

    assert [path for _, path in server.calls] == [
        f"/allocations/{A}/usage",
        f"/allocations/{A}/finish",
        f"/allocations/{B}/usage",
    ]
    assert sorted(server.samples[A]) == [1, 2, 3]
    assert not reporter.outbox


def test_a_failed_delivery_keeps_the_reports_for_later(server):
    server.failures["/usage"] = 1
    reporter = reporter_for(server)
    reporter.usage(A, sample(1))
    reporter.finish(A, 0, "exited")

    reporter.flush()

    assert len(reporter.outbox) == 2
    assert A not in server.finished


def test_a_report_the_server_can_never_accept_is_dropped_so_others_flow(server):
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(f"{A}/usage"):
            return problem(404, "No such allocation.")
        return server.handle(request)

    reporter = reporter_for(server, handle)
    reporter.usage(A, sample(1))
    reporter.finish(B, 1, "exited")

    reporter.flush()

    assert server.finished[B] == {"exit_code": 1, "reason": "exited"}
    assert not reporter.outbox


def test_usage_the_server_refuses_as_implausible_or_late_is_dropped_not_retried(server):
    """The server's usage rules answer 422 or 409 (problem+json): final, so the batch goes and
    the reports behind it flow, rather than the batch being sent again forever."""
    answers = {A: problem(422, "More GPU time than the allocation had."), B: problem(409, "Released long ago.")}
    tries = []

    def handle(request: httpx.Request) -> httpx.Response:
        for allocation_id, answer in answers.items():
            if request.url.path.endswith(f"{allocation_id}/usage"):
                tries.append(allocation_id)
                return answer
        return server.handle(request)

    reporter = reporter_for(server, handle)
    reporter.usage(A, sample(1))
    reporter.usage(A, sample(2))
    reporter.usage(B, sample(1))
    reporter.finish(A, 0, "exited")

    reporter.flush()
    reporter.flush()

    assert tries == [A, B]
    assert server.finished[A] == {"exit_code": 0, "reason": "exited"}
    assert not reporter.outbox
