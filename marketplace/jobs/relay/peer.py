"""The hop between connection servers: a request for a job whose agent's stream another server
holds is relayed through that server, which takes peers on RELAY_PEER_BIND and records where
(the host RELAY_PEER_ADVERTISE, or the one bound, and the port bound) with its lease.

A peer connection is one TCP connection per channel: a line of JSON naming the target, signed
with an HMAC of SECRET_KEY (every server of a deployment shares it) and dated, so that nothing
else on the network can open channels; a line of JSON in answer ({"ok": true} or {"status",
"detail"}); then the channel's bytes both ways, its half close as TCP's.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time

from django.conf import settings

from marketplace.jobs.relay.channels import Channel, ChannelClosed, Unavailable
from nodes.agent.protocol import Relay

logger = logging.getLogger(__name__)

SIGNED_FOR_S = 60.0
MAX_LINE = 4096


def _signature(fields: dict) -> str:
    text = "|".join(str(fields[name]) for name in ("job", "allocation", "unit", "port", "at"))
    return hmac.new(settings.SECRET_KEY.encode(), text.encode(), hashlib.sha256).hexdigest()


class PeerChannel:
    """A channel held by another server, read and written as a local one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, job_id: str) -> None:
        self._reader, self._writer = reader, writer
        self.job_id = job_id
        self.closed = ""
        self.bytes_in = self.bytes_out = 0

    async def read(self) -> bytes:
        try:
            data = await asyncio.wait_for(self._reader.read(Relay.CHUNK), settings.RELAY_IDLE_TIMEOUT_S)
        except TimeoutError:
            await self.close("idle")
            raise ChannelClosed("idle") from None
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        self.bytes_out += len(data)
        return data

    async def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), settings.RELAY_IDLE_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise ChannelClosed(type(exc).__name__) from None
        self.bytes_in += len(data)

    async def write_eof(self) -> None:
        with contextlib.suppress(OSError):
            self._writer.write_eof()

    async def close(self, why: str = "closed") -> None:
        self.closed = self.closed or why
        self._writer.close()


async def connect(target) -> PeerChannel:
    """A channel to ``target`` (access.Target) through the server holding its stream."""
    if not target.holder_address:
        raise Unavailable(503, "The shed running the job is not connected now.", 5.0)
    host, _, port = target.holder_address.rpartition(":")
    fields = {"job": target.job_id, "allocation": target.allocation_id, "unit": target.unit_id,
              "port": target.port, "at": int(time.time())}  # fmt: skip
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5.0)
        writer.write(json.dumps({**fields, "sig": _signature(fields)}).encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(reader.readline(), settings.RELAY_OPEN_TIMEOUT_S + 5))
    except (OSError, TimeoutError, ValueError):
        raise Unavailable(503, "The server holding the shed's connection did not answer.", 5.0) from None
    if not answer.get("ok"):
        writer.close()
        raise Unavailable(int(answer.get("status") or 502), str(answer.get("detail") or ""), answer.get("retry_after"))
    return PeerChannel(reader, writer, target.job_id)


async def serve(hub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One peer's channel, on the server holding the stream."""

    async def answer(body: dict) -> None:
        writer.write(json.dumps(body).encode() + b"\n")
        await writer.drain()

    channel: Channel | None = None
    try:
        line = await asyncio.wait_for(reader.readline(), 10.0)
        request = json.loads(line[:MAX_LINE])
        signed = hmac.compare_digest(str(request.get("sig", "")), _signature(request))
        if not signed or abs(time.time() - float(request["at"])) > SIGNED_FOR_S:
            writer.close()
            return
        stream = hub.streams.get(str(request["unit"]))
        if stream is None:
            await answer({"status": 503, "detail": "The shed running the job is reconnecting.", "retry_after": 5.0})
            return
        try:
            channel = await hub.relay.connect(
                stream, job_id=str(request["job"]), allocation_id=str(request["allocation"]), port=int(request["port"])
            )
        except Unavailable as exc:
            await answer({"status": exc.status, "detail": exc.detail, "retry_after": exc.retry_after})
            return
        await answer({"ok": True})
        await splice(channel, reader, writer)
    except (OSError, TimeoutError, ValueError, KeyError, TypeError):
        pass
    finally:
        if channel is not None:
            await channel.close("peer gone")
            hub.relay.forget(channel)
        writer.close()


async def splice(channel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Move bytes between a channel and a TCP connection until both directions end."""

    async def inward() -> None:
        while data := await reader.read(Relay.CHUNK):
            await channel.write(data)
        await channel.write_eof()

    async def outward() -> None:
        while data := await channel.read():
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    tasks = [asyncio.ensure_future(inward()), asyncio.ensure_future(outward())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    except (ChannelClosed, OSError):
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
