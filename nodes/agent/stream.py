"""The agent's stream: one outbound WebSocket to the server, held by a background thread.

Over it the agent makes its calls (heartbeats and allocation reports; ``AgentClient`` sends them
here while the stream is up, else over HTTP) and the server pushes assignments and state (cancels,
preemptions, policy) the moment they commit. The main loop takes the pushes at its next tick; the
thread only moves frames. The wire protocol is in ``protocol.py``.

While the stream cannot be held (the server refuses it, the network drops it, a proxy does not
pass WebSockets) the agent polls over HTTP as before, and the thread tries the stream again:
soon after a server went away, after at most STREAM_RETRY_S otherwise.
"""

import itertools
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from nodes.agent import __version__, logs, protocol
from nodes.agent.backoff import Backoff, jittered
from nodes.agent.relay import AddressOf, AgentRelay

logger = logging.getLogger(__name__)

Close = protocol.StreamClose
# After these the server is going away or was busy: come back soon, to it or another.
_SOON = {Close.GOING_AWAY, Close.SERVICE_RESTART, Close.SILENT}


class StreamUnavailable(Exception):
    """The call could not go over the stream (not connected, or it dropped before the answer):
    make it over HTTP instead."""


def stream_url(server_url: str) -> str:
    """ws(s)://host/api/agent/v1/stream for the server's http(s) base URL."""
    base = server_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    return f"{base}{protocol.API_PREFIX}/{protocol.STREAM}"


class Stream:
    """The connection and its thread. ``start()`` begins connecting; ``close()`` ends it."""

    def __init__(
        self,
        server_url: str,
        credential: str,
        *,
        retry_s: float = protocol.STREAM_RETRY_S,
        open_timeout_s: float = 10.0,
        ping_interval_s: float = protocol.STREAM_PING_S,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.url = stream_url(server_url)
        self._headers = {"Authorization": f"Bearer {credential}"}
        self._retry_s = retry_s
        self._open_timeout_s = open_timeout_s
        self._ping_interval_s = ping_interval_s
        self._rng = rng
        self._backoff = Backoff(base_s=1.0, cap_s=retry_s, rng=rng)
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._lock = threading.Lock()
        self._ws: ClientConnection | None = None
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._assignments: deque[dict] = deque()
        self._states: deque[dict] = deque()
        self._thread: threading.Thread | None = None
        # What `shedshare-agent status` shows: "connecting", "connected", or why it is on HTTP.
        self.state = "connecting"
        self.connection = ""  # the server's id of the connection, as its logs name it
        self.connects = 0
        self._address_of: AddressOf | None = None
        self._relay: AgentRelay | None = None  # the relay channels of the connection up now

    def serve_ports(self, address_of: AddressOf) -> None:
        """Relay channels to jobs' ports (``relay.py``), reached at what ``address_of`` says;
        without it every channel is refused."""
        self._address_of = address_of

    # -- the main loop's side ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def start(self) -> "Stream":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="agent-stream", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        ws = self._ws
        if ws is not None:
            ws.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def call(self, path: str, body: dict[str, Any], *, timeout_s: float) -> tuple[int, Any, float | None]:
        """Make one call over the stream: (status, body, Retry-After or None), as HTTP answers it.
        Raises StreamUnavailable when it cannot (then the caller uses HTTP)."""
        with self._lock:
            ws = self._ws
            if ws is None:
                raise StreamUnavailable("not connected")
            call_id = next(self._ids)
            answer: Future = Future()
            self._pending[call_id] = answer
        try:
            ws.send(json.dumps({"id": call_id, "method": "POST", "path": path, "body": body}))
            frame = answer.result(timeout=timeout_s)
        except (ConnectionClosed, FutureTimeout, StreamUnavailable, OSError) as exc:
            raise StreamUnavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            with self._lock:
                self._pending.pop(call_id, None)
        retry_after = frame.get("retry_after")
        return int(frame.get("status") or 0), frame.get("body"), float(retry_after) if retry_after else None

    def assignments(self) -> list[dict]:
        """The assignments pushed since the last look, oldest first (kept across reconnects:
        the server has handed them to us)."""
        return _drain(self._assignments)

    def states(self) -> list[dict]:
        """The states pushed since the last look, oldest first."""
        return _drain(self._states)

    # -- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self._hold()
            if self._stop.is_set():
                return
            self._sleep(wait)

    def _hold(self) -> float:
        """Connect, serve the connection until it ends; return how long to wait before the next try."""
        self.state = "connecting"
        try:
            with connect(
                self.url,
                additional_headers=self._headers,
                user_agent_header=f"shedshare-agent/{__version__}",
                open_timeout=self._open_timeout_s,
                ping_interval=self._ping_interval_s,
                ping_timeout=self._ping_interval_s,
                close_timeout=5.0,
                max_size=protocol.STREAM_MAX_FRAME,
                compression=None,  # small JSON frames: not worth the memory on either side
            ) as ws:
                return self._serve(ws)
        except InvalidStatus as exc:  # an HTTP answer instead of a WebSocket: this server has no stream
            return self._fall_back(f"refused: HTTP {exc.response.status_code}", self._retry_s)
        except (OSError, TimeoutError, WebSocketException) as exc:
            return self._fall_back(f"cannot connect: {type(exc).__name__}: {exc}", self._backoff.failure())

    def _serve(self, ws: ClientConnection) -> float:
        try:
            hello = json.loads(ws.recv(timeout=self._open_timeout_s))
            if hello.get("push") != "hello":
                raise ValueError(f"expected a hello, got {str(hello)[:80]}")
        except (ConnectionClosed, TimeoutError, ValueError, AttributeError) as exc:
            return self._closed(exc)
        self.connection = str((hello.get("body") or {}).get("connection", ""))
        self.connects += 1
        self._backoff.success()
        relay = AgentRelay(
            lambda message: ws.send(json.dumps(message)), ws.send, self._port_address,
        )  # fmt: skip
        with self._lock:
            self._ws = ws
            self._relay = relay
        self.state = "connected"
        logs.event(logger, "stream_connected", connection=self.connection)
        try:
            while True:
                self._received(ws.recv())
        except ConnectionClosed as exc:
            return self._closed(exc)
        finally:
            relay.drop_all()
            with self._lock:
                self._ws = None
                self._relay = None
                waiting, self._pending = self._pending, {}
            for answer in waiting.values():
                answer.set_exception(StreamUnavailable("the stream dropped"))

    def drop_channels(self, allocation_id: str) -> None:
        """End the relay channels to this allocation's job (it is being stopped)."""
        relay = self._relay
        if relay is not None:
            relay.drop_allocation(allocation_id)

    def _port_address(self, allocation_id: str, port: int) -> "tuple[str, int] | str":
        if self._address_of is None:
            return "this agent serves no ports"
        return self._address_of(allocation_id, port)

    def _received(self, text: str | bytes) -> None:
        if isinstance(text, bytes):  # a relay channel's bytes
            relay = self._relay
            if relay is not None:
                relay.data(text)
            return
        try:
            frame = json.loads(text)
        except ValueError:
            # Its size, not its text: an answer may carry the values of a job's secrets.
            logs.event(logger, "stream_bad_frame", logging.WARNING, size=len(text))
            return
        if not isinstance(frame, dict):
            return
        if "re" in frame:
            with self._lock:
                answer = self._pending.get(frame["re"])
            if answer is not None and not answer.done():
                answer.set_result(frame)
            return
        if "relay" in frame:
            relay = self._relay
            if relay is not None:
                relay.control(frame)
            return
        body = frame.get("body")
        if frame.get("push") == "assignment" and isinstance(body, dict):
            self._assignments.append(body)
        elif frame.get("push") == "state" and isinstance(body, dict):
            self._states.append(body)

    def _closed(self, exc: Exception) -> float:
        code = getattr(getattr(exc, "rcvd", None), "code", None)
        if code == Close.REPLACED:
            # Another agent with our credential connected: do not fight it over the stream.
            return self._fall_back("replaced by a newer connection of this unit", self._retry_s)
        if code == Close.UNAUTHORISED:
            return self._fall_back("credential refused (HTTP calls show why)", self._retry_s)
        if code in _SOON:
            self.state = f"reconnecting (server closed {code})"
            logs.event(logger, "stream_closed", code=code)
            return jittered(1.0, 0.5, self._rng)
        return self._fall_back(f"dropped ({code or type(exc).__name__})", self._backoff.failure())

    def _fall_back(self, why: str, wait_s: float) -> float:
        if not self.state.startswith("http"):
            logs.event(logger, "stream_unavailable", logging.WARNING, why=why, retry_in_s=round(wait_s, 1))
        self.state = f"http: {why}"
        return wait_s


def _drain(queue: deque) -> list:
    taken = []
    while queue:
        taken.append(queue.popleft())
    return taken


def wait_connected(stream: Stream, timeout_s: float, *, clock: Callable[[], float] = time.monotonic) -> bool:
    """Wait until the stream is up (tests, and the agent's first beat); whether it is."""
    deadline = clock() + timeout_s
    while not stream.connected and clock() < deadline:
        time.sleep(0.01)
    return stream.connected
