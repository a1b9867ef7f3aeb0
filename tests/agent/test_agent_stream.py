"""The agent's stream (nodes/agent/stream.py) against a real WebSocket server in a thread that
speaks the stream protocol in front of the fake agent API: calls over it, pushes, closes, and the
fall back to HTTP polling."""

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.sync.server import ServerConnection, serve

from nodes.agent import protocol
from nodes.agent.client import AgentClient, Conflict, RateLimited
from nodes.agent.loop import Agent, Options
from nodes.agent.runtime.process import ProcessRuntime
from nodes.agent.stream import Stream, stream_url, wait_connected
from tests.agent.fakes import CREDENTIAL, HONOURS_ALL, PREFIX, FakeServer

WAIT_S = 15.0  # generous; every wait below ends as soon as what it waits for happens


class StreamServer:
    """The server's side of the stream in front of a FakeServer: calls go to the fake's routes
    (recorded in ``over_stream``), ``push`` sends a frame, ``close`` ends a connection."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.refuse_handshake = False
        self.answer_calls = True
        self.connections: list[ServerConnection] = []
        self.over_stream: list[str] = []
        self.connected = threading.Condition()

    def _process_request(self, connection, request):
        if self.refuse_handshake:
            return Response(404, "Not Found", Headers({"Content-Length": "0"}), b"")
        return None

    def handler(self, ws: ServerConnection) -> None:
        if ws.request.headers.get("Authorization") != f"Bearer {CREDENTIAL}":
            ws.close(protocol.StreamClose.UNAUTHORISED)
            return
        ws.send(json.dumps({"push": "hello", "body": {"connection": f"c{len(self.connections) + 1}"}}))
        with self.connected:
            self.connections.append(ws)
            self.connected.notify_all()
        for text in ws:
            frame = json.loads(text)
            self.over_stream.append(frame["path"])
            if not self.answer_calls:
                continue
            request = httpx.Request(
                "POST", f"http://shed.test{PREFIX}/{frame['path']}", json=frame["body"],
                headers={"Authorization": f"Bearer {CREDENTIAL}"},
            )  # fmt: skip
            response = self.fake.handle(request)
            answer = response.json() if response.content else None
            reply = {"re": frame["id"], "status": response.status_code, "body": answer}
            if "Retry-After" in response.headers:
                reply["retry_after"] = float(response.headers["Retry-After"])
            ws.send(json.dumps(reply))

    def wait_connections(self, count: int) -> ServerConnection:
        with self.connected:
            assert self.connected.wait_for(lambda: len(self.connections) >= count, WAIT_S), "no connection"
            return self.connections[count - 1]

    def push(self, kind: str, body: dict, connection: int = -1) -> None:
        self.connections[connection].send(json.dumps({"push": kind, "body": body}))


@contextmanager
def stream_server(fake: FakeServer) -> Iterator[tuple[StreamServer, str]]:
    side = StreamServer(fake)
    with serve(side.handler, "127.0.0.1", 0, process_request=side._process_request) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield side, f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        finally:
            server.shutdown()
            thread.join(5)


def eventually(check, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.01)


def client_for(fake: FakeServer, url: str, **stream_options) -> AgentClient:
    stream = Stream(url, CREDENTIAL, **stream_options).start()
    return AgentClient("http://shed.test", CREDENTIAL, transport=fake.transport(), stream=stream)


def test_the_stream_url_follows_the_server_url():
    assert stream_url("https://market.example/") == "wss://market.example/api/agent/v1/stream"
    assert stream_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/api/agent/v1/stream"


def test_calls_go_over_the_stream_while_it_is_up_with_the_answers_http_gives(server):
    with stream_server(server) as (side, url), client_for(server, url) as client:
        assert wait_connected(client.stream, WAIT_S)
        reply = client.heartbeat(gpus=[], running=[])
        assert reply["status"] == "online"
        allocation_id = server.assign(["true"])
        server.queue.clear()
        client.start(allocation_id)
        assert side.over_stream == ["heartbeat", f"allocations/{allocation_id}/start"]
        assert ("POST", "/heartbeat") in server.calls  # the fake's routes answered, over the stream
        server.refuse_start = True
        with pytest.raises(Conflict):  # the same error as over HTTP
            client.start(allocation_id)
        assert client.stream.state == "connected"


def test_the_start_names_the_image_digest_over_the_stream(server):
    digest = "sha256:" + "ab" * 32
    allocation_id = server.assign(["true"])
    with stream_server(server) as (side, url), client_for(server, url) as client:
        assert wait_connected(client.stream, WAIT_S)

        client.start(allocation_id, digest)

        assert side.over_stream == [f"allocations/{allocation_id}/start"]
        assert server.start_bodies[allocation_id] == {"image_digest": digest}


def test_the_secrets_are_asked_for_over_the_stream_while_it_is_up(server):
    allocation_id = server.assign(["true"], secrets={"HF_TOKEN": "hf_value"})
    with stream_server(server) as (side, url), client_for(server, url) as client:
        assert wait_connected(client.stream, WAIT_S)

        assert client.secrets(allocation_id) == {"env": {"HF_TOKEN": "hf_value"}}
        assert side.over_stream == [f"allocations/{allocation_id}/secrets"]


def test_a_retry_after_over_the_stream_reaches_the_caller(server, monkeypatch):
    def busy(self, *args):
        return httpx.Response(503, json={"title": "Busy", "status": 503}, headers={"Retry-After": "7"})

    monkeypatch.setattr(FakeServer, "_heartbeat_reply", busy)
    with stream_server(server) as (side, url), client_for(server, url) as client:
        assert wait_connected(client.stream, WAIT_S)
        with pytest.raises(RateLimited) as limited:
            client.heartbeat(gpus=[], running=[])
        assert limited.value.retry_after == 7.0
        assert side.over_stream == ["heartbeat"]


def test_a_server_without_streams_leaves_the_agent_on_http(server):
    with stream_server(server) as (side, url):
        side.refuse_handshake = True
        with client_for(server, url, retry_s=60.0) as client:
            eventually(lambda: client.stream.state.startswith("http: refused: HTTP 404"), "the fallback")
            assert client.heartbeat(gpus=[], running=[])["status"] == "online"
            assert side.over_stream == [] and ("POST", "/heartbeat") in server.calls


def test_a_call_the_stream_drops_is_made_over_http(server):
    with stream_server(server) as (side, url), client_for(server, url) as client:
        assert wait_connected(client.stream, WAIT_S)
        side.answer_calls = False
        dropper = threading.Thread(target=lambda: (eventually(lambda: side.over_stream, "the call"),
                                                   side.connections[0].close(1011)))  # fmt: skip
        dropper.start()
        assert client.heartbeat(gpus=[], running=[])["status"] == "online"
        dropper.join()
        assert side.over_stream == ["heartbeat"] and ("POST", "/heartbeat") in server.calls


@pytest.mark.parametrize(
    ("code", "reconnects"),
    [
        (protocol.StreamClose.SERVICE_RESTART, True),  # the server restarts: back at once
        (protocol.StreamClose.GOING_AWAY, True),
        (protocol.StreamClose.REPLACED, False),  # another connection of the unit: do not fight it
        (protocol.StreamClose.UNAUTHORISED, False),
    ],
)
def test_what_a_close_code_makes_the_agent_do(server, code, reconnects):
    with stream_server(server) as (side, url), client_for(server, url, retry_s=60.0) as client:
        side.wait_connections(1).close(code)
        if reconnects:
            side.wait_connections(2)
            assert wait_connected(client.stream, WAIT_S)
        else:
            eventually(lambda: client.stream.state.startswith("http: "), "the fallback")
            time.sleep(0.5)
            assert len(side.connections) == 1 and not client.stream.connected


def make_agent(server: FakeServer, client: AgentClient, tmp_path: Path) -> Agent:
    options = Options(usage_interval_s=0.2, max_jobs=1, tick_s=0.02, poll_wait_s=0, error_base_s=0.05)
    runtime = ProcessRuntime(tmp_path / "work", tmp_path / "logs", kill_grace_s=1.0)
    return Agent(client, runtime, server.inventory, options, policy=HONOURS_ALL)


def test_pushed_work_runs_without_a_poll_and_a_pushed_cancel_stops_it_at_once(server, tmp_path):
    server.heartbeat_interval_s = 30.0  # no heartbeat answer can carry the cancel in time
    with stream_server(server) as (side, url), client_for(server, url) as client:
        assert wait_connected(client.stream, WAIT_S)
        allocation_id = server.assign(["sleep", "30"], gpu_count=1)
        assignment = server.queue.popleft()
        agent = make_agent(server, client, tmp_path)
        runner = threading.Thread(target=agent.run)
        runner.start()
        side.push("assignment", assignment)
        eventually(lambda: server.started == [allocation_id] and allocation_id in agent.allocations
                   and agent.allocations[allocation_id].handle is not None, "the pushed job started")  # fmt: skip
        cancelled_at = time.monotonic()
        side.push("state", {"status": "online", "heartbeat_interval_s": 30, "cancel": [allocation_id],
                            "preempt": [], "policy": None})  # fmt: skip
        eventually(lambda: agent.allocations.get(allocation_id) is None
                   or agent.allocations[allocation_id].stop_reason is not None, "the cancel taken")  # fmt: skip
        took = time.monotonic() - cancelled_at
        runner.join(WAIT_S)
        assert not runner.is_alive()
        assert took < 1.0  # the next tick (20 ms), not the next heartbeat (30 s)
        assert server.finished[allocation_id] == {"exit_code": 143, "reason": "cancelled"}
        assert ("GET", "/assignments/next") not in server.calls  # no poll while the stream was up
        assert f"allocations/{allocation_id}/finish" in side.over_stream


def test_the_agent_polls_over_http_while_the_stream_is_down(server, tmp_path):
    with stream_server(server) as (side, url):
        side.refuse_handshake = True
        with client_for(server, url, retry_s=60.0) as client:
            eventually(lambda: client.stream.state.startswith("http: "), "the fallback")
            allocation_id = server.assign(["true"], gpu_count=1)
            make_agent(server, client, tmp_path).run()
        assert server.finished[allocation_id] == {"exit_code": 0, "reason": "exited"}
        assert ("GET", "/assignments/next") in server.calls
