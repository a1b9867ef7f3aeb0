"""The agent's end of relay channels (``protocol.Relay``): each a TCP connection to a port of a
job this agent runs, carried over its stream, so that a renter reaches the job's service through
the marketplace while the shed opens no port at all.

The stream's thread hands control frames and bytes over (``control``, ``data``) and never
blocks on a channel: each channel has two threads of its own, one moving the job's bytes onto the
stream as the server's credit allows, one writing the server's bytes to the job's socket and
giving credit back as they go. Which address a job's port has is the runtime's business
(``address_of``); only ports the job declared are reached.
"""

import contextlib
import logging
import queue
import socket
import struct
import threading
from collections.abc import Callable

from nodes.agent import logs
from nodes.agent.protocol import Relay

logger = logging.getLogger(__name__)

_EOF = object()  # in a channel's inbox: the server sends no more bytes
_HEADER = struct.Struct(">I")

# (allocation id, port) -> (host, port) to connect to, or a str: why not (told to the server)
AddressOf = Callable[[str, int], "tuple[str, int] | str"]


def frame(channel: int, data: bytes) -> bytes:
    return _HEADER.pack(channel) + data


def unframe(payload: bytes) -> tuple[int, bytes] | None:
    if len(payload) < Relay.HEADER:
        return None
    return _HEADER.unpack_from(payload)[0], payload[Relay.HEADER :]


class AgentRelay:
    """The channels of one stream connection."""

    def __init__(
        self,
        send_text: Callable[[dict], None],
        send_bytes: Callable[[bytes], None],
        address_of: AddressOf,
        *,
        max_channels: int = 256,
        connect_timeout_s: float = Relay.OPEN_TIMEOUT_S,
    ) -> None:
        self._send_text = send_text
        self._send_bytes = send_bytes
        self._address_of = address_of
        self._max_channels = max_channels
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._channels: dict[int, _Channel] = {}

    @property
    def open_channels(self) -> int:
        with self._lock:
            return len(self._channels)

    def control(self, message: dict) -> None:
        kind, number = message.get("relay"), message.get("channel")
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**32:
            return
        if kind == Relay.OPEN:
            self._open(number, message.get("allocation_id"), message.get("port"))
            return
        with self._lock:
            channel = self._channels.get(number)
        if channel is None:
            return
        if kind == Relay.CREDIT and isinstance(message.get("bytes"), int):
            channel.credited(message["bytes"])
        elif kind == Relay.EOF:
            channel.inbox.put(_EOF)
        elif kind == Relay.CLOSE:
            channel.end(tell=False)

    def data(self, payload: bytes) -> None:
        parsed = unframe(payload)
        if parsed is None:
            return
        number, data = parsed
        with self._lock:
            channel = self._channels.get(number)
        if channel is not None:
            channel.received(data)

    def drop_allocation(self, allocation_id: str) -> None:
        """End the channels to one job's ports, telling the server."""
        with self._lock:
            channels = [c for c in self._channels.values() if c.allocation_id == allocation_id]
        for channel in channels:
            channel.end(tell=True, detail="the job is stopping")

    def drop_all(self) -> None:
        """The stream is gone: so is every channel over it."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.end(tell=False)

    def _open(self, number: int, allocation_id, port) -> None:
        def refuse(detail: str) -> None:
            self._tell({"relay": Relay.REFUSED, "channel": number, "detail": detail})

        if not isinstance(allocation_id, str) or not isinstance(port, int) or isinstance(port, bool):
            return refuse("an open names an allocation and a port")
        with self._lock:
            if number in self._channels:
                return refuse("that channel is open")
            if len(self._channels) >= self._max_channels:
                return refuse(f"this agent relays at most {self._max_channels} channels at once")
            channel = _Channel(self, number, allocation_id)
            self._channels[number] = channel
        threading.Thread(target=channel.run, args=(allocation_id, port), name=f"relay-{number}", daemon=True).start()

    def _forget(self, number: int) -> None:
        with self._lock:
            self._channels.pop(number, None)

    def _tell(self, message: dict) -> bool:
        try:
            self._send_text(message)
            return True
        except Exception:  # noqa: BLE001 - the stream dropped: drop_all follows
            return False


class _Channel:
    def __init__(self, relay: AgentRelay, number: int, allocation_id: str) -> None:
        self.relay = relay
        self.number = number
        self.allocation_id = allocation_id
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sock: socket.socket | None = None
        self._credit = Relay.WINDOW  # bytes we may still send the server
        self._unacked_in = 0  # bytes the server sent that are not written to the job yet
        self._cond = threading.Condition()
        self._ended = False

    # -- the stream's thread ------------------------------------------------------------------

    def credited(self, amount: int) -> None:
        with self._cond:
            self._credit += max(0, amount)
            self._cond.notify_all()

    def received(self, data: bytes) -> None:
        with self._cond:
            self._unacked_in += len(data) + Relay.FRAME_COST
            over = self._unacked_in > Relay.WINDOW or not 0 < len(data) <= Relay.CHUNK
        if over:
            logs.event(logger, "relay_window_exceeded", logging.WARNING, channel=self.number)
            self.end(tell=True, detail="a frame past the window, or out of bounds")
            return
        self.inbox.put(data)

    def end(self, *, tell: bool, detail: str = "") -> None:
        with self._cond:
            if self._ended:
                return
            self._ended = True
            self._cond.notify_all()
            sock = self.sock  # under the lock: a connect that finishes after this closes its own
        self.relay._forget(self.number)
        self.inbox.put(None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if tell:
            self.relay._tell({"relay": Relay.CLOSE, "channel": self.number, "detail": detail})

    # -- its own threads ----------------------------------------------------------------------

    def run(self, allocation_id: str, port: int) -> None:
        """Connect to the job's port, then move the job's bytes to the server until either ends."""
        address = self.relay._address_of(allocation_id, port)
        if isinstance(address, str):
            self.relay._forget(self.number)
            self.relay._tell({"relay": Relay.REFUSED, "channel": self.number, "detail": address})
            return
        try:
            sock = socket.create_connection(address, timeout=self.relay._connect_timeout_s)
        except OSError as exc:
            self.relay._forget(self.number)
            detail = f"nothing answers on port {port} of the job ({type(exc).__name__})"
            self.relay._tell({"relay": Relay.REFUSED, "channel": self.number, "detail": detail})
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            ended = self._ended
            if not ended:
                self.sock = sock
        if ended:  # ended while it connected: no one else will close it
            sock.close()
            return
        if not self.relay._tell({"relay": Relay.OPENED, "channel": self.number}):
            self.end(tell=False)
            return
        threading.Thread(target=self._to_job, name=f"relay-{self.number}-in", daemon=True).start()
        self._from_job(sock)

    def _from_job(self, sock: socket.socket) -> None:
        try:
            while True:
                with self._cond:
                    while self._credit <= Relay.FRAME_COST and not self._ended:
                        self._cond.wait()
                    if self._ended:
                        return
                    room = min(self._credit - Relay.FRAME_COST, Relay.CHUNK)
                data = sock.recv(room)
                if not data:
                    self.relay._tell({"relay": Relay.EOF, "channel": self.number})
                    return
                with self._cond:
                    self._credit -= len(data) + Relay.FRAME_COST
                self.relay._send_bytes(frame(self.number, data))
        except Exception:  # noqa: BLE001 - the job closed, or the stream dropped
            self.end(tell=True, detail="the job's connection ended")

    def _to_job(self) -> None:
        sock, owed = self.sock, 0
        try:
            while True:
                item = self.inbox.get()
                if item is None:
                    return
                if item is _EOF:
                    sock.shutdown(socket.SHUT_WR)
                    continue
                sock.sendall(item)
                with self._cond:
                    self._unacked_in -= len(item) + Relay.FRAME_COST
                owed += len(item) + Relay.FRAME_COST
                if owed >= Relay.WINDOW // 4:
                    self.relay._tell({"relay": Relay.CREDIT, "channel": self.number, "bytes": owed})
                    owed = 0
        except Exception:  # noqa: BLE001 - the job closed its end
            self.end(tell=True, detail="the job's connection ended")
