"""The relay's endpoints on the connection servers: a job's HTTP ports at
``RELAY_HTTP_PREFIX/<job id>/<port>/<path>``, and any declared port as a WebSocket tunnel at
``/api/v1/jobs/<job id>/ports/<port>/forward`` (what ``shedshare forward`` opens).

Both take the renter's API key (``Authorization: Bearer``; for HTTP also ``X-Shedshare-Key``,
leaving ``Authorization`` to the service) and never pass it on. The HTTP endpoint writes the
request to the job's port over a channel as HTTP/1.1 (``Connection: close``, one request per
channel) and streams the answer back as it comes (chunks, server-sent events), with h11 parsing
the job's side. Bounds: RELAY_REQUEST_MAX_BYTES and RELAY_RESPONSE_MAX_BYTES, RELAY_IDLE_TIMEOUT_S
without a byte either way, RELAY_CHANNELS_PER_JOB at once; each answered as a problem.
"""

import asyncio
import contextlib
import json
import logging
import re
from collections import defaultdict

import h11
from django.conf import settings
from django.utils import timezone

from marketplace.jobs.relay import access, peer
from marketplace.jobs.relay.channels import ChannelClosed, Unavailable
from marketplace.kernel.api.errors import PROBLEM_CONTENT_TYPE

logger = logging.getLogger(__name__)

FORWARD_PATH = re.compile(r"/api/v1/jobs/(?P<job>[0-9a-fA-F-]{36})/ports/(?P<port>[0-9]{1,5})/forward")
_HTTP_PATH = re.compile(r"/(?P<job>[^/]{1,64})/(?P<port>[0-9]{1,5})(?P<rest>/.*)?", re.DOTALL)
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
               b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length"}  # fmt: skip
# CONNECT would turn the job's connection into a tunnel (use `shedshare forward`); TRACE echoes.
_REFUSED_METHODS = {"CONNECT", "TRACE"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
KEY_HEADER = b"x-shedshare-key"
# A WebSocket tunnel refused after its handshake closes with 4000 + the HTTP status it would have had.
CLOSE_BASE = 4000


class Traffic:
    """Requests and bytes by (job, day, port), kept in memory and stored every few seconds."""

    def __init__(self) -> None:
        self.counts: dict = defaultdict(lambda: [0, 0, 0])

    def add(self, target: access.Target, channel) -> None:
        row = self.counts[(target.job_id, timezone.now().date(), target.port, settings.RELAY_LOCATION)]
        row[0] += 1
        row[1] += channel.bytes_in
        row[2] += channel.bytes_out

    def take(self) -> dict:
        counts, self.counts = dict(self.counts), defaultdict(lambda: [0, 0, 0])
        return counts


LOOKUPS_WAITING_MAX = 256  # relay lookups queued for the database beyond which a request is a 503


async def _target(hub, token: str, job_id: str, port: int, protocol: str | None, scope: str) -> access.Target:
    """Who may reach what, from the database: a 503 (never a 500) when it cannot say now."""
    if hub.relay.lookups_waiting >= LOOKUPS_WAITING_MAX:
        raise Unavailable(503, "The relay is busy; try again shortly.", 1.0)
    hub.relay.lookups_waiting += 1
    try:
        return await hub.db(access.target, token, job_id, port, protocol=protocol, scope=scope, pool="relay")
    except Unavailable:
        raise
    except Exception:  # noqa: BLE001 - the database is away
        logger.warning("relay_lookup_failed job=%s", job_id, exc_info=True)
        raise Unavailable(503, "The marketplace cannot look the job up now.", 5.0) from None
    finally:
        hub.relay.lookups_waiting -= 1


async def _channel(hub, target: access.Target):
    """A channel to the target: over the stream held here, or through the server that holds it."""
    stream = hub.streams.get(target.unit_id)
    refusal = access.relay_refusal(target, here=settings.RELAY_LOCATION, through_holder=stream is None)
    if refusal is not None:
        raise Unavailable(421, refusal)
    if stream is not None:
        return await hub.relay.connect(
            stream, job_id=target.job_id, allocation_id=target.allocation_id, port=target.port
        )
    if target.holder == hub.server_id or not target.holder:
        raise Unavailable(503, "The shed running the job is not connected now.", 5.0)
    return await peer.connect(target)


async def _ended(hub, channel) -> None:
    if hasattr(channel, "stream"):
        hub.relay.forget(channel)  # first: a close the agent does not take must not keep the slot
    await channel.close()


# -- HTTP ------------------------------------------------------------------------------------------


_HOST_LABEL = re.compile(r"(?P<job>[0-9a-f-]{36})-(?P<port>[0-9]{1,5})")


def service_of(scope) -> dict | None:
    """What a request is for, {"job", "port", "rest"} (all str; None values where the URL is
    malformed): by its host, <job id>-<port>.RELAY_SERVICE_DOMAIN, or by its path,
    RELAY_HTTP_PREFIX/<job id>/<port>/<rest>; None when it is for neither (Django serves it)."""
    domain = settings.RELAY_SERVICE_DOMAIN
    if domain:
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").lower().rsplit(":", 1)[0]
        if host.endswith("." + domain):
            label = _HOST_LABEL.fullmatch(host[: -len(domain) - 1])
            return {"job": label["job"], "port": label["port"], "rest": scope["path"]} if label else {}
    prefix = settings.RELAY_HTTP_PREFIX
    if scope["path"].startswith(prefix + "/"):
        match = _HTTP_PATH.fullmatch(scope["path"][len(prefix) :])
        return {"job": match["job"], "port": match["port"], "rest": match["rest"] or "/"} if match else {}
    return None


def service_url(base: str, job_id, port: int) -> str:
    """The URL of a job's HTTP port, for a server reached at ``base`` (scheme://host)."""
    domain = settings.RELAY_SERVICE_DOMAIN
    if domain:
        return f"{base.split('://', 1)[0]}://{job_id}-{port}.{domain}/"
    return f"{base}{settings.RELAY_HTTP_PREFIX}/{job_id}/{port}/"


def job_services(job, base: str, requests_today: dict[int, int]) -> list[dict]:
    """The job's ports as its renter reaches them, for a server reached at ``base``: the URL (an
    HTTP port's) or the command that forwards it, and the requests served today (by port)."""
    services = []
    for entry in job.ports or []:
        port, kind = entry["port"], entry.get("protocol", "http")
        services.append({
            "port": port,
            "protocol": kind,
            "url": service_url(base, job.pk, port) if kind == "http" else None,
            "forward": f"shedshare forward {job.pk} {port}",
            "requests_today": requests_today.get(port, 0),
        })  # fmt: skip
    return services


async def http_application(hub, scope, receive, send) -> None:
    """One request to a job's HTTP port (``service_of`` says which)."""
    match = service_of(scope)
    headers = list(scope.get("headers") or [])
    if not match:
        detail = "A service URL is <job id>-<port>.<service domain>/<path> or <prefix>/<job id>/<port>/<path>."
        return await _problem(send, Unavailable(404, detail))
    token, headers = _credential(headers)
    declared = dict(headers).get(b"content-length", b"")
    if scope["method"] in _REFUSED_METHODS:
        return await _problem(
            send, Unavailable(405, f"{scope['method']} is not relayed; a tunnel is `shedshare forward`.")
        )
    if declared.isdigit() and int(declared) > settings.RELAY_REQUEST_MAX_BYTES:
        return await _problem(
            send, Unavailable(413, f"A request body may be at most {settings.RELAY_REQUEST_MAX_BYTES} bytes.")
        )
    raw_rest = _raw_rest(scope, match["rest"])
    if raw_rest is None:
        return await _problem(send, Unavailable(400, "The service URL's prefix may not be percent-encoded."))
    needs = "read" if scope["method"] in SAFE_METHODS else "submit"
    try:
        target = await _target(hub, token, match["job"], int(match["port"]), "http", needs)
        channel = await _channel(hub, target)
    except Unavailable as exc:
        return await _problem(send, exc)
    try:
        await _exchange(channel, scope, headers, match["rest"], raw_rest, target.port, receive, send)
    finally:
        await _ended(hub, channel)
        hub.traffic.add(target, channel)


def _raw_rest(scope, rest: str) -> bytes | None:
    """The request's target for the job as the client wrote it (still percent-encoded: the
    decoded path would let %3F become a query, or %2F a folder), with its query."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    prefix = scope["path"][: len(scope["path"]) - len(rest)].encode("utf-8")
    if not raw.startswith(prefix):
        return None
    target = raw[len(prefix) :] or b"/"
    return target + (b"?" + scope["query_string"] if scope.get("query_string") else b"")


def _credential(headers: list) -> tuple[str, list]:
    """The renter's API key, and the headers without it."""
    for name, value in headers:
        if name.lower() == KEY_HEADER:
            return value.decode("latin-1").strip(), [(n, v) for n, v in headers if n.lower() != KEY_HEADER]
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return credential.strip(), [(n, v) for n, v in headers if n.lower() != b"authorization"]
    return "", headers


async def _exchange(channel, scope, headers: list, path: str, target: bytes, port: int, receive, send) -> None:
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
    client = (scope.get("client") or ("", 0))[0]
    forwarded = [
        (n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP and not n.lower().startswith(b"x-forwarded-")
    ]
    forwarded += [(b"host", f"localhost:{port}".encode()),
                  (b"connection", b"close"), (b"x-forwarded-for", client.encode()),
                  (b"x-forwarded-proto", scope.get("scheme", "http").encode()),
                  (b"x-forwarded-prefix", scope["path"][: len(scope["path"]) - len(path)].encode())]  # fmt: skip
    names = {name.lower() for name, _ in headers}
    declared = dict((n.lower(), v) for n, v in headers).get(b"content-length")
    if b"transfer-encoding" in names or (declared is None and scope["method"] not in SAFE_METHODS | {"DELETE"}):
        forwarded.append((b"transfer-encoding", b"chunked"))  # a body of unknown length, re-chunked
    elif declared is not None:
        forwarded.append((b"content-length", declared))
    started, body = False, None
    try:
        await channel.write(connection.send(h11.Request(method=scope["method"], target=target, headers=forwarded)))
        body = asyncio.ensure_future(_request_body(channel, connection, receive))
        started = await _response(channel, connection, scope, send)
    except (ChannelClosed, h11.RemoteProtocolError, h11.LocalProtocolError, Unavailable, OSError) as exc:
        if not started:  # after the head there is no status to change: the answer ends short
            failure: Exception = exc
            if body is not None:
                await asyncio.wait([body], timeout=1.0)  # a body that failed says why better
                if body.done() and not body.cancelled() and isinstance(body.exception(), Unavailable):
                    failure = body.exception()
            status, detail = _failure(failure, channel)
            await _problem(send, Unavailable(status, detail))
    finally:
        if body is not None:
            body.cancel()
            await asyncio.gather(body, return_exceptions=True)


def _failure(exc: Exception, channel) -> tuple[int, str]:
    if isinstance(exc, Unavailable):
        return exc.status, exc.detail
    if isinstance(exc, h11.RemoteProtocolError):
        return 502, "The job's answer was not HTTP/1.1."
    if isinstance(exc, OSError):
        return 502, "The shed's connection dropped."
    if channel.closed == "idle":
        return 504, f"The job sent nothing for {settings.RELAY_IDLE_TIMEOUT_S:g} s."
    return 502, f"The job's connection ended: {channel.closed or exc}."


async def _request_body(channel, connection: h11.Connection, receive) -> None:
    size = 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), settings.RELAY_IDLE_TIMEOUT_S)
        except TimeoutError:
            await channel.close("the request stalled")
            raise Unavailable(408, f"The request's body stalled for {settings.RELAY_IDLE_TIMEOUT_S:g} s.") from None
        if message["type"] != "http.request":
            await channel.close("the client went away")
            return
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > settings.RELAY_REQUEST_MAX_BYTES:
            await channel.close("request too large")
            raise Unavailable(413, f"A request body may be at most {settings.RELAY_REQUEST_MAX_BYTES} bytes.")
        if chunk:
            await channel.write(connection.send(h11.Data(data=chunk)))
        if not message.get("more_body", False):
            await channel.write(connection.send(h11.EndOfMessage()))
            break
    # The body is sent; what comes now is the client leaving (a reader of an endless stream that
    # gave up): then the job's answer has no one to go to.
    while (await receive())["type"] == "http.request":
        pass
    await channel.close("the client went away")


async def _response(channel, connection: h11.Connection, scope, send) -> bool:
    """Stream the job's answer to the client; whether its head went out."""
    started, size = False, 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await channel.read())
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            chunked = any(n.lower() == b"transfer-encoding" for n, _ in event.headers)
            keep = (
                (lambda n: n not in _HOP_BY_HOP) if chunked else (lambda n: n not in _HOP_BY_HOP - {b"content-length"})
            )
            headers = [(n, v) for n, v in event.headers if keep(n.lower())]
            await send({"type": "http.response.start", "status": event.status_code, "headers": headers})
            started = True
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > settings.RELAY_RESPONSE_MAX_BYTES:
                logger.info("relay_response_cut job=%s bytes=%d", channel.job_id, size)
                raise ChannelClosed("the response is over RELAY_RESPONSE_MAX_BYTES")
            await send({"type": "http.response.body", "body": event.data, "more_body": True})
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return started
        else:  # PAUSED (a switch of protocols the relay never asked for) or anything unforeseen
            raise h11.RemoteProtocolError(f"unexpected {event!r}")


async def _problem(send, exc: Unavailable) -> None:
    titles = {400: "Bad request", 401: "Unauthorised", 403: "Forbidden", 404: "Not found", 405: "Method not relayed",
              408: "Request timeout", 410: "Gone", 413: "Request too large", 421: "Served elsewhere",
              429: "Too many connections",
              502: "Bad gateway", 503: "Service unavailable", 504: "Gateway timeout"}  # fmt: skip
    body = json.dumps({"type": "about:blank", "title": titles.get(exc.status, "Error"), "status": exc.status,
                       "detail": exc.detail}).encode()  # fmt: skip
    headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    if exc.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="api"'))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- TCP, as a WebSocket tunnel --------------------------------------------------------------------


async def forward_application(hub, scope, receive, send) -> None:
    """``shedshare forward``'s connection: the WebSocket's binary messages are the TCP stream."""
    match = FORWARD_PATH.fullmatch(scope["path"])
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    token, _ = _credential(list(scope.get("headers") or []))
    try:
        target = await _target(hub, token, match["job"], int(match["port"]), None, "submit")
        channel = await _channel(hub, target)
    except Unavailable as exc:
        return await send({"type": "websocket.close", "code": CLOSE_BASE + exc.status, "reason": exc.detail[:120]})

    async def inward() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await channel.write_eof()
                return
            data = message.get("bytes") or (message.get("text") or "").encode()
            if data:
                await channel.write(data)

    async def outward() -> None:
        while data := await channel.read():
            await send({"type": "websocket.send", "bytes": data})
        await send({"type": "websocket.close", "code": 1000})

    tasks = [asyncio.ensure_future(inward()), asyncio.ensure_future(outward())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait(tasks, timeout=settings.RELAY_IDLE_TIMEOUT_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # already closed
            await send({"type": "websocket.close", "code": 1000})
        await _ended(hub, channel)
        hub.traffic.add(target, channel)
