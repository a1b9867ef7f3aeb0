"""The relay's channels on both ends, without a network: the server's (marketplace/jobs/relay/
channels.py) against a scripted agent, and the agent's (nodes/agent/relay.py) against a real
local TCP server standing in for the job. An agent speaks only for its own channels and within
its window; a peer that cannot sign is not heard."""

import asyncio
import json
import secrets
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from marketplace.jobs.relay import peer
from marketplace.jobs.relay.channels import ChannelClosed, Channels, Unavailable
from nodes.agent.protocol import Relay
from nodes.agent.relay import AgentRelay, frame, unframe
from tests.conftest import run_async

WAIT_S = 10.0


class FakeStream:
    """A stream as the hub holds it: what the server sends to the agent is recorded."""

    def __init__(self, unit_id: str = "unit-1") -> None:
        self.unit_id = unit_id
        self.frames: list[dict] = []
        self.sent: list[bytes] = []
        self.frame_sent = asyncio.Event()

    async def send_frame(self, text: str) -> None:
        self.frames.append(json.loads(text))
        self.frame_sent.set()

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


async def opened(channels: Channels, stream: FakeStream, **fields):
    """A channel the scripted agent opens as soon as it is asked."""
    before = len(stream.frames)
    task = asyncio.ensure_future(channels.connect(stream, job_id="job-1", allocation_id="a-1", port=8000, **fields))
    while len(stream.frames) == before:
        await asyncio.sleep(0)
    ask = stream.frames[-1]
    assert ask == {"relay": Relay.OPEN, "channel": ask["channel"], "allocation_id": "a-1", "port": 8000}
    channels.agent_frame(stream, {"relay": Relay.OPENED, "channel": ask["channel"]})
    return await task


def test_bytes_flow_both_ways_within_the_window_and_credit_reopens_it(settings):
    async def scenario():
        channels, stream = Channels(), FakeStream()
        channel = await opened(channels, stream)
        header = struct.pack(">I", channel.number)
        channels.agent_bytes(stream, header + b"hello")
        assert await channel.read() == b"hello"
        # The server writes at most the window (bytes and frames) before the agent's credit.
        writer = asyncio.ensure_future(channel.write(b"x" * (Relay.WINDOW + 10)))
        await asyncio.sleep(0.05)
        cost = sum(len(d) - 4 + Relay.FRAME_COST for d in stream.sent)
        assert not writer.done() and Relay.WINDOW - Relay.FRAME_COST <= cost <= Relay.WINDOW
        assert all(0 < len(d) - 4 <= Relay.CHUNK and d[:4] == header for d in stream.sent)
        channels.agent_frame(stream, {"relay": Relay.CREDIT, "channel": channel.number, "bytes": cost})
        await asyncio.wait_for(writer, WAIT_S)
        assert channel.bytes_in == Relay.WINDOW + 10 == sum(len(d) - 4 for d in stream.sent)
        channels.agent_frame(stream, {"relay": Relay.EOF, "channel": channel.number})
        assert await channel.read() == b""

    run_async(scenario())


def test_an_agent_is_not_heard_for_another_streams_channel_nor_past_its_window():
    async def scenario():
        channels, ours, theirs = Channels(), FakeStream("unit-1"), FakeStream("unit-2")
        channel = await opened(channels, ours)
        header = struct.pack(">I", channel.number)
        channels.agent_bytes(theirs, header + b"forged")
        channels.agent_frame(theirs, {"relay": Relay.CLOSE, "channel": channel.number})
        assert not channel.closed and channel.bytes_out == 0
        channels.agent_bytes(ours, header + b"x" * (Relay.WINDOW + 1))  # more than it was given room for
        await asyncio.sleep(0.01)
        assert channel.closed and ours.frames[-1]["relay"] == Relay.CLOSE
        with pytest.raises(ChannelClosed):
            await channel.read()

    run_async(scenario())


def test_a_refused_open_is_a_502_and_a_silent_agent_a_504(settings):
    settings.RELAY_OPEN_TIMEOUT_S = 0.05

    async def scenario():
        channels, stream = Channels(), FakeStream()
        task = asyncio.ensure_future(channels.connect(stream, job_id="job-1", allocation_id="a-1", port=8000))
        await stream.frame_sent.wait()
        channels.agent_frame(stream, {"relay": Relay.REFUSED, "channel": stream.frames[-1]["channel"],
                                      "detail": "nothing answers on port 8000"})  # fmt: skip
        with pytest.raises(Unavailable) as refused:
            await task
        assert refused.value.status == 502 and "nothing answers" in refused.value.detail
        with pytest.raises(Unavailable) as silent:
            await channels.connect(stream, job_id="job-1", allocation_id="a-1", port=8000)
        assert silent.value.status == 504
        assert channels.open == {} and not channels.by_job and not channels.by_unit

    run_async(scenario())


def test_a_job_has_at_most_its_channels_at_once(settings):
    settings.RELAY_CHANNELS_PER_JOB = 2

    async def scenario():
        channels, stream = Channels(), FakeStream()
        first, second = await opened(channels, stream), await opened(channels, stream)
        with pytest.raises(Unavailable) as third:
            await channels.connect(stream, job_id="job-1", allocation_id="a-1", port=8000)
        assert third.value.status == 429 and third.value.retry_after
        await first.close()
        channels.forget(first)
        assert (await opened(channels, stream)).number not in (first.number, second.number)
        channels.stream_gone(stream)
        with pytest.raises(ChannelClosed):
            await second.read()

    run_async(scenario())


def test_a_peer_that_cannot_sign_is_not_heard(settings):
    async def scenario():
        hub = SimpleNamespace(streams={}, relay=Channels())
        server = await asyncio.start_server(lambda r, w: peer.serve(hub, r, w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        fields = {"job": "j", "allocation": "a", "unit": "u", "port": 80, "at": int(time.time()),
                  "nonce": secrets.token_hex(8)}  # fmt: skip

        async def ask(body: dict) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(json.dumps(body).encode() + b"\n")
            answer = await asyncio.wait_for(reader.read(), WAIT_S)
            writer.close()
            return answer

        assert await ask({**fields, "sig": "0" * 64}) == b""  # closed without a word
        stale = {**fields, "at": int(time.time()) - 3600, "nonce": secrets.token_hex(8)}
        assert await ask({**stale, "sig": peer._signature(stale)}) == b""
        assert await ask(["not", "an", "object"]) == b""
        signed = json.loads(await ask({**fields, "sig": peer._signature(fields)}))
        assert signed["status"] == 503  # a real peer: told the stream is not here
        assert await ask({**fields, "sig": peer._signature(fields)}) == b""  # the same line again: a replay
        server.close()

    run_async(scenario())


# -- the agent's end -------------------------------------------------------------------------------


class Recorder:
    """The agent's stream: what its relay sends to the server."""

    def __init__(self) -> None:
        self.texts: list[dict] = []
        self.data: list[bytes] = []
        self.changed = threading.Condition()

    def text(self, message: dict) -> None:
        with self.changed:
            self.texts.append(message)
            self.changed.notify_all()

    def binary(self, payload: bytes) -> None:
        with self.changed:
            self.data.append(payload)
            self.changed.notify_all()

    def wait(self, predicate) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, WAIT_S), (self.texts, len(self.data))


@pytest.fixture
def echo_job():
    """A job's port: a TCP echo server."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()
    listener.close()


def test_the_agent_relays_to_the_job_and_refuses_what_it_does_not_run(echo_job):
    sent = Recorder()
    allowed = {("a-1", 8000): echo_job}
    relay = AgentRelay(sent.text, sent.binary, lambda a, p: allowed.get((a, p), "the job declared no such port"))
    relay.control({"relay": Relay.OPEN, "channel": 7, "allocation_id": "a-1", "port": 9999})
    sent.wait(lambda: sent.texts)
    assert sent.texts[0] == {"relay": Relay.REFUSED, "channel": 7, "detail": "the job declared no such port"}

    relay.control({"relay": Relay.OPEN, "channel": 8, "allocation_id": "a-1", "port": 8000})
    sent.wait(lambda: {"relay": Relay.OPENED, "channel": 8} in sent.texts)
    relay.data(frame(8, b"ping"))
    sent.wait(lambda: b"".join(unframe(d)[1] for d in sent.data) == b"ping")
    relay.data(frame(8, b"x" * (Relay.WINDOW + 1)))  # past the window the server may use
    sent.wait(lambda: any(t.get("relay") == Relay.CLOSE and t["channel"] == 8 for t in sent.texts))
    assert relay.open_channels == 0


def test_stopping_a_job_ends_its_channels_and_a_dropped_stream_all(echo_job):
    sent = Recorder()
    relay = AgentRelay(sent.text, sent.binary, lambda a, p: echo_job)
    for number, allocation in ((1, "a-1"), (2, "a-2")):
        relay.control({"relay": Relay.OPEN, "channel": number, "allocation_id": allocation, "port": 1})
    sent.wait(lambda: sum(t.get("relay") == Relay.OPENED for t in sent.texts) == 2)
    relay.drop_allocation("a-1")
    sent.wait(lambda: {"relay": Relay.CLOSE, "channel": 1, "detail": "the job is stopping"} in sent.texts)
    assert relay.open_channels == 1
    relay.drop_all()
    assert relay.open_channels == 0
