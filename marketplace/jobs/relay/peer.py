"""The hop between connection servers: a request for a job whose agent's stream another server
holds is relayed through that server, which takes peers on RELAY_PEER_BIND and records where
(the host RELAY_PEER_ADVERTISE, or the one bound, and the port bound) with its lease.

A peer connection is one TCP connection per channel: a line of JSON naming the target, dated,
with a nonce, and signed with an HMAC under a key derived from SECRET_KEY (every server of a
deployment shares it), so that nothing else on the network can open channels, nor replay a line
it saw (each nonce is taken once within SIGNED_FOR_S); a line of JSON in answer ({"ok": true} or
{"status", "detail"}); then the channel's bytes both ways, its half close as TCP's. The bytes
cross the deployment's own network as they are: run the servers on a private network (or a
service mesh's mutual TLS) as the database and Redis are.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time

from django.conf import settings

from marketplace.jobs.relay.channels import Channel, ChannelClosed, Unavailable
from nodes.agent.protocol import Relay

logger = logging.getLogger(__name__)

SIGNED_FOR_S = 60.0
HELLO_TIMEOUT_S = 5.0
PEERS_AT_ONCE = 1024  # peer connections a server holds at once; more are closed at once
_SIGNED = ("job", "allocation", "unit", "port", "at", "nonce")
_nonces: dict[str, float] = {}  # nonce -> when it was taken (monotonic), within SIGNED_FOR_S
_peers = 0


def _signature(fields: dict) -> str:
    key = hashlib.sha256(b"shedshare.relay.peer:" + settings.SECRET_KEY.encode()).digest()
    text = "|".join(str(fields.get(name, "")) for name in _SIGNED)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _fresh(nonce: str) -> bool:
    """Whether the nonce was not taken before (within SIGNED_FOR_S); takes it."""
    now = time.monotonic()
    for old in [n for n, at in _nonces.items() if now - at > SIGNED_FOR_S]:
        del _nonces[old]
    if not nonce or nonce in _nonces:
        return False
    _nonces[nonce] = now
    return True


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
              "port": target.port, "at": int(time.time()), "nonce": secrets.token_hex(16)}  # fmt: skip
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5.0)
        writer.write(json.dumps({**fields, "sig": _signature(fields)}).encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(reader.readline(), settings.RELAY_OPEN_TIMEOUT_S + 5))
        if not isinstance(answer, dict):
            raise ValueError("not an answer")
        if not answer.get("ok"):
            retry_after = answer.get("retry_after")
            raise Unavailable(int(answer.get("status") or 502), str(answer.get("detail") or "")[:300],
                              float(retry_after) if isinstance(retry_after, int | float) else None)  # fmt: skip
    except (OSError, TimeoutError, ValueError, TypeError):
        if writer is not None:
            writer.close()
        raise Unavailable(503, "The server holding the shed's connection did not answer.", 5.0) from None
    except Unavailable:
        writer.close()
        raise
    return PeerChannel(reader, writer, target.job_id)


async def serve(hub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One peer's channel, on the server holding the stream."""

    async def answer(body: dict) -> None:
        writer.write(json.dumps(body).encode() + b"\n")
        await writer.drain()

    global _peers
    channel: Channel | None = None
    if _peers >= PEERS_AT_ONCE:
        writer.close()
        return
    _peers += 1
    try:
        request = json.loads(await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT_S))
        if not isinstance(request, dict):
            return
        signed = hmac.compare_digest(str(request.get("sig", "")), _signature(request))
        if not signed or abs(time.time() - float(request["at"])) > SIGNED_FOR_S or not _fresh(str(request["nonce"])):
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
        _peers -= 1
        if channel is not None:
            hub.relay.forget(channel)
            await channel.close("peer gone")
        writer.close()


async def splice(channel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Move bytes between a channel and a TCP connection until both directions end."""

    async def inward() -> None:
        while data := await asyncio.wait_for(reader.read(Relay.CHUNK), settings.RELAY_IDLE_TIMEOUT_S):
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
    except (ChannelClosed, OSError, TimeoutError):
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
