"""The server's end of relay channels (``protocol.Relay``): byte streams to a running job's port,
carried over its agent's stream, each with the window the protocol gives it.

A ``Channel`` reads and writes like a socket (``read`` gives b"" at the end, ``write`` waits for
the agent's credit, ``write_eof`` half-closes, ``close`` ends it); ``Channels`` opens them on a
hub's streams, hands the agent's frames to them, and ends them with their stream. A channel to a
stream that another connection server holds goes through that server (``peer.py``) and reads and
writes the same.
"""

import asyncio
import contextlib
import itertools
import json
import struct
from collections import Counter, deque

from django.conf import settings

from nodes.agent.protocol import Relay

_HEADER = struct.Struct(">I")


class ChannelClosed(Exception):
    """The channel ended: the job closed it, the agent or its stream went away, or it was idle
    past RELAY_IDLE_TIMEOUT_S."""


class Unavailable(Exception):
    """No channel: ``status`` and ``detail`` say why, as the endpoint answers it."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after


class Channel:
    def __init__(self, stream, number: int, job_id: str, send_frame, send_bytes) -> None:
        self.stream = stream
        self.number = number
        self.job_id = job_id
        self._send_frame = send_frame  # async (str)
        self._send_bytes = send_bytes  # async (bytes)
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inbox: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._eof = False
        self.closed = ""  # why, once it is over
        self._credit = Relay.WINDOW
        self._credited = asyncio.Event()
        self._credited.set()
        self._owed = 0  # bytes read off the channel not yet credited back
        self._unread = 0
        self.bytes_in = 0  # to the job
        self.bytes_out = 0  # from the job

    # -- the agent's frames, from the hub -------------------------------------------------------

    def agent_opened(self) -> None:
        if not self.opened.done():
            self.opened.set_result(None)

    def agent_data(self, data: bytes) -> bool:
        """Bytes from the job; False if they break the window (the channel is then over)."""
        self._unread += len(data) + Relay.FRAME_COST
        if self._unread > Relay.WINDOW or not 0 < len(data) <= Relay.CHUNK:
            return False
        self.bytes_out += len(data)
        self._inbox.append(data)
        self._readable.set()
        return True

    def agent_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def agent_credit(self, amount: int) -> None:
        self._credit += max(0, amount)
        self._credited.set()

    def ended(self, why: str) -> None:
        if not self.closed:
            self.closed = why or "closed"
        if not self.opened.done():
            self.opened.set_exception(Unavailable(502, why or "The job's port did not answer."))
            self.opened.exception()  # retrieved: whoever waits has its own copy
        self._readable.set()
        self._credited.set()

    # -- the endpoint's side ---------------------------------------------------------------------

    async def read(self) -> bytes:
        """The job's next bytes; b"" once it has sent its last. Raises ChannelClosed."""
        while not self._inbox:
            if self._eof:
                return b""
            if self.closed:
                raise ChannelClosed(self.closed)
            self._readable.clear()
            try:
                await asyncio.wait_for(self._readable.wait(), settings.RELAY_IDLE_TIMEOUT_S)
            except TimeoutError:
                await self.close("idle")
                raise ChannelClosed("idle") from None
        data = self._inbox.popleft()
        self._unread -= len(data) + Relay.FRAME_COST
        self._owed += len(data) + Relay.FRAME_COST
        if self._owed >= Relay.WINDOW // 4 and not self.closed:
            owed, self._owed = self._owed, 0
            await self._control(Relay.CREDIT, bytes=owed)
        return data

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self._credit <= Relay.FRAME_COST and not self.closed:
                self._credited.clear()
                try:
                    await asyncio.wait_for(self._credited.wait(), settings.RELAY_IDLE_TIMEOUT_S)
                except TimeoutError:
                    await self.close("idle")
            if self.closed:
                raise ChannelClosed(self.closed)
            size = min(len(view), self._credit - Relay.FRAME_COST, Relay.CHUNK)
            self._credit -= size + Relay.FRAME_COST
            self.bytes_in += size
            await self._send(self._send_bytes(_HEADER.pack(self.number) + bytes(view[:size])))
            view = view[size:]

    async def write_eof(self) -> None:
        if not self.closed:
            await self._control(Relay.EOF)

    async def close(self, why: str = "closed") -> None:
        if not self.closed:
            self.ended(why)
            await self._control(Relay.CLOSE, detail=why)

    async def _control(self, kind: str, **fields) -> None:
        with contextlib.suppress(ChannelClosed):  # it is over: ended says so
            await self._send(self._send_frame(json.dumps({"relay": kind, "channel": self.number, **fields})))

    async def _send(self, sending) -> None:
        """A send over the stream, bounded: an agent that stops reading its stream holds no
        channel (nor the request on it) past RELAY_IDLE_TIMEOUT_S."""
        try:
            await asyncio.wait_for(sending, settings.RELAY_IDLE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the stream is gone or stuck: so is the channel
            self.ended("the shed's connection dropped")
            raise ChannelClosed(self.closed) from None


class Channels:
    """The relay channels of one connection server's streams."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.lookups_waiting = 0  # renters' requests waiting for the database (endpoints._target)
        self.open: dict[int, Channel] = {}
        self.by_job: Counter = Counter()
        self.by_unit: Counter = Counter()

    async def connect(self, stream, *, job_id: str, allocation_id: str, port: int) -> Channel:
        """A channel to ``port`` of the job running as ``allocation_id`` on the stream's unit,
        once the agent has connected it. Raises Unavailable."""
        if self.by_job[job_id] >= settings.RELAY_CHANNELS_PER_JOB:
            raise Unavailable(429, f"The job has {settings.RELAY_CHANNELS_PER_JOB} connections open.", 1.0)
        if self.by_unit[stream.unit_id] >= settings.RELAY_CHANNELS_PER_UNIT:
            raise Unavailable(429, "The shed serves as many connections as it may now.", 1.0)
        number = next(self._numbers) % 2**32

        async def send_bytes(data: bytes) -> None:
            await stream.send_bytes(data)

        channel = Channel(stream, number, job_id, stream.send_frame, send_bytes)
        self.open[number] = channel
        self.by_job[job_id] += 1
        self.by_unit[stream.unit_id] += 1
        try:
            await channel._control(Relay.OPEN, allocation_id=allocation_id, port=port)
            await asyncio.wait_for(asyncio.shield(channel.opened), settings.RELAY_OPEN_TIMEOUT_S)
        except TimeoutError:
            self.forget(channel)
            await channel.close("the shed did not answer")
            raise Unavailable(504, "The shed did not connect to the job's port in time.") from None
        except BaseException:  # refused, or the request went away meanwhile: the slot is free again
            self.forget(channel)
            channel.ended("not opened")
            raise
        return channel

    def forget(self, channel: Channel) -> None:
        if self.open.pop(channel.number, None) is channel:
            self.by_job[channel.job_id] -= 1
            self.by_unit[channel.stream.unit_id] -= 1
            for counter, key in ((self.by_job, channel.job_id), (self.by_unit, channel.stream.unit_id)):
                if counter[key] <= 0:
                    del counter[key]

    def agent_frame(self, stream, frame: dict) -> None:
        channel = self.open.get(frame.get("channel"))
        if channel is None or channel.stream is not stream:
            return  # not this stream's: an agent speaks only for its own channels
        kind = frame.get("relay")
        if kind == Relay.OPENED:
            channel.agent_opened()
        elif kind == Relay.REFUSED:
            channel.ended(str(frame.get("detail") or "refused")[:200])
        elif kind == Relay.EOF:
            channel.agent_eof()
        elif kind == Relay.CLOSE:
            channel.ended(str(frame.get("detail") or "closed by the shed")[:200])
        elif kind == Relay.CREDIT and isinstance(frame.get("bytes"), int):
            channel.agent_credit(frame["bytes"])

    def agent_bytes(self, stream, data: bytes) -> None:
        if len(data) <= Relay.HEADER:
            return
        channel = self.open.get(_HEADER.unpack_from(data)[0])
        if channel is None or channel.stream is not stream or channel.closed:
            return
        if not channel.agent_data(data[Relay.HEADER :]):
            asyncio.get_running_loop().create_task(channel.close("the shed sent past its window"))

    def stream_gone(self, stream) -> None:
        for channel in [c for c in self.open.values() if c.stream is stream]:
            channel.ended("the shed's connection dropped")
