"""The connection server: each agent's stream, held by an asynchronous process without a thread
per connection (the wire protocol is in ``nodes/agent/protocol.py``).

One ``Hub`` per process holds its streams and four loops that serve them all: it renews the
process's lease (the units it holds count as seen), reads the nudges that other processes commit
(work placed, a job cancelled or preempted, a policy changed, a newer stream of a unit opened)
and pushes what they announce, writes the GPU readings the heartbeats brought to the cache, and
closes streams whose agent fell silent. Database work runs in a small pool of threads.

A heartbeat that changes nothing the marketplace decides on is answered from memory and writes
no row. One goes through in full (the HTTP view, through ``calls.call``) when it may change
something: the first of a stream, a different inventory, limits or country, a running set other
than the one this server followed through the starts and finishes it served, a unit
not online, an allocation the agent was sent but no longer reports past the grace, or every
STREAM_FULL_BEAT_S anyway.

Usage reports, the commonest call of a busy fleet (every running job's agent reports every few
seconds), are taken together: those that arrive while one transaction stores the ones before
are stored by the next, in a few statements for all of them (``usage_record_many``). One that
cannot be taken so (a body the API would refuse, an allocation not of its unit, a batch a rule
refuses) is made alone through the HTTP view, which gives its answer.
"""

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache import cache
from django.db import connections
from django.utils import timezone

from marketplace.jobs import agent_use_cases as use_cases
from marketplace.jobs.agent_api.serializers import AssignmentSerializer, UsageSerializer
from marketplace.jobs.agent_stream import calls
from marketplace.jobs.relay import access as relay_access
from marketplace.jobs.relay import endpoints as relay_endpoints
from marketplace.jobs.relay import peer as relay_peer
from marketplace.jobs.relay.channels import Channels
from marketplace.kernel import metrics
from nodes import services as unit_services
from nodes import streams
from nodes.agent import protocol
from nodes.models import Unit, UnitNudge

logger = logging.getLogger(__name__)

_ALLOCATION_CALL = re.compile(r"allocations/([0-9a-fA-F-]{36})/(" + "|".join(protocol.ALLOCATION_ACTIONS) + ")")
_ALIVE = {Unit.Status.ONLINE, Unit.Status.DRAINING}
_TELEMETRY = ("temperature_c", "power_w")
_STOPS = ("cancel", "preempt")  # the answer's lists of allocations the agent must stop
SERVER_SHUTDOWN = 1012  # the code a connection ends with when this server shuts down
CLOSE_WAIT_S = 5.0  # the longest closing a stream may wait for its sends
wall_clock = time.time  # the minutes the connect budget counts in (tests fix it)


def _problem(status: int, title: str, detail: str) -> dict:
    return {"type": "about:blank", "title": title, "status": status, "detail": detail}


def _decision_key(beat: dict) -> str:
    """The heartbeat without its telemetry and its running set (compared on its own, as this
    server follows it through the starts and finishes it serves): what placement decides on."""
    gpus = beat.get("gpus")
    if isinstance(gpus, list):
        gpus = [{k: v for k, v in gpu.items() if k not in _TELEMETRY} if isinstance(gpu, dict) else gpu for gpu in gpus]
    return json.dumps({**beat, "gpus": gpus, "running": None}, sort_keys=True, default=str)


def _readings(beat: dict) -> list[dict] | None:
    """The beat's GPU readings, if every one is plausible (else None: the full path judges)."""
    gpus = beat.get("gpus")
    if not isinstance(gpus, list) or not all(isinstance(gpu, dict) for gpu in gpus):
        return None
    readings = []
    for gpu in gpus:
        temperature, power = gpu.get("temperature_c"), gpu.get("power_w")
        if temperature is not None and not (isinstance(temperature, int) and -50 <= temperature <= 200):
            return None
        if power is not None and not (isinstance(power, int | float) and 0 <= power <= 100_000):
            return None
        readings.append({"uuid": gpu.get("uuid"), "temperature_c": temperature, "power_w": power})
    return readings


_tuned = False


def tune_process() -> None:
    """Tune this process's interpreter for holding streams, once. It answers thousands of cheap
    heartbeats on its event loop between the database calls of its pool threads, and two things
    of the interpreter's defaults stalled that loop for hundreds of milliseconds:

    - The garbage collector's full collections, which walk every object the process holds (the
      streams, Django's modules) and came every few seconds, as Django's requests leave cycles:
      what exists once the server is up is frozen out of collection, and the young generation
      collected less often (STREAM_GC_THRESHOLDS), so full collections come rarely.
    - The GIL's switch interval: a pool thread running Python kept the loop waiting up to 5 ms
      each time it wanted the interpreter back (STREAM_SWITCH_INTERVAL_S)."""
    global _tuned
    if _tuned or not settings.STREAM_TUNE_PROCESS:
        return
    _tuned = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(*settings.STREAM_GC_THRESHOLDS)
    sys.setswitchinterval(settings.STREAM_SWITCH_INTERVAL_S)


def _frame(data) -> str:
    return json.dumps(data, default=str, separators=(",", ":"))


@dataclass(eq=False)
class Stream:
    """One agent's connection."""

    unit_id: str
    connection: str
    environ: dict
    credential: str  # the node credential it was admitted with
    send_frame: object  # async (str) -> None
    close_with: object  # async (int) -> None
    send_bytes: object  # async (bytes) -> None: a relay channel's
    opened_at: float
    last_beat_at: float
    key: str | None = None  # the last full heartbeat's decision key
    reply: dict | None = None  # what a heartbeat is answered with now
    running: set[str] = field(default_factory=set)  # as the last full beat said, plus starts, less finishes
    # Allocations whose start or finish is being served (until: inf) or was just served (until:
    # the agent's next beat at the active cadence): a beat sent across the call may list them or
    # not, and is no change for that.
    settling: dict[str, float] = field(default_factory=dict)
    full_at: float = 0.0
    active_until: float = 0.0
    full_needed: bool = True
    expected: dict[str, float] = field(default_factory=dict)  # allocation id -> picked up (POSIX)
    sample_at: float = 0.0
    calls: int = 0
    closing: str = ""  # why this server closes it: "replaced", "silent"
    opened_nudge: int = 0  # the id of the "connected" nudge its opening wrote
    beat_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tokens: float = 0.0  # frames it may still send now (a token bucket, STREAM_FRAMES_PER_S)
    tokens_at: float = 0.0
    looking: bool = False
    look_again: bool = False

    def admit(self, now: float) -> bool:
        """Whether one more frame is within the stream's budget: STREAM_FRAMES_PER_S, with
        bursts of ten seconds' worth (an honest agent sends a few a second at most)."""
        rate = settings.STREAM_FRAMES_PER_S
        self.tokens = min(rate * 10, self.tokens + (now - self.tokens_at) * rate)
        self.tokens_at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def interval(self, now: float) -> int:
        active = now < self.active_until
        return settings.HEARTBEAT_INTERVAL_S if active else settings.HEARTBEAT_IDLE_INTERVAL_S

    def running_agrees(self, running: set[str], now: float) -> bool:
        """Whether the agent's running set is the one this server follows, but for starts and
        finishes that are settling."""
        self.settling = {allocation: until for allocation, until in self.settling.items() if until >= now}
        return all(allocation in self.settling for allocation in running ^ self.running)

    def beat_is_cheap(self, key: str, running: set[str], now: float, lease_ok: bool) -> bool:
        if not lease_ok or self.full_needed or key != self.key or self.reply is None:
            return False
        if not self.running_agrees(running, now):
            return False
        if now - self.full_at >= settings.STREAM_FULL_BEAT_S:
            return False
        grace_ago = time.time() - settings.AGENT_LOST_GRACE.total_seconds()
        return not any(at < grace_ago for allocation, at in self.expected.items() if allocation not in self.running)


class Hub:
    def __init__(self) -> None:
        self.server_id = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.streams: dict[str, Stream] = {}
        # Three pools, so that no kind of work waits behind another: the hub's own (its lease, the
        # nudges, telemetry), whose delay would make every unit it holds look silent; the pushes
        # (``look``), which must go out within a second of their commit; and the agents' calls
        # (admissions, full heartbeats, reports), which a reconnecting fleet can queue deep.
        self._threads = {"hub": 1, "push": 2, "calls": settings.STREAM_THREADS, "relay": 2}
        self._pools = {
            name: ThreadPoolExecutor(threads, thread_name_prefix=f"stream-{name}")
            for name, threads in self._threads.items()
        }
        self.calls_waiting = 0  # agents' calls queued for the "calls" pool, not yet running
        self.stats: Counter = Counter()  # what it served since its last stats line (_stats_loop)
        self._usage_waiting: list[tuple[str, str, dict, asyncio.Future]] = []  # for the next usage round
        self._usage_rounds: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._readings: dict[str, dict] = {}
        self._sample: set[str] = set()
        self._last_nudge: int | None = None
        self.renewed_at = -1e9  # monotonic time of the last lease renewal that committed
        self._woken = asyncio.Event()
        # Set once the nudge loop knows where the nudges stand: a stream attached before then
        # could miss one written between its first look and that reading.
        self.nudges_read = asyncio.Event()
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        # Renters' connections to jobs' ports over the streams held here (marketplace/jobs/relay/).
        self.relay = Channels()
        self.traffic = relay_endpoints.Traffic()
        self.relay_address = ""  # where other servers reach this one's streams
        self._peers: asyncio.AbstractServer | None = None

    # -- database work, in the pool -------------------------------------------------------------

    async def db(self, fn, *args, pool: str = "calls", **kwargs):
        loop = asyncio.get_running_loop()
        queued = pool == "calls"

        def call_started() -> None:  # on the event loop, as every count of calls_waiting is
            self.calls_waiting -= 1

        def run():
            if queued:
                loop.call_soon_threadsafe(call_started)
            try:
                return fn(*args, **kwargs)
            finally:
                calls.connections_tidy()

        if queued:
            self.calls_waiting += 1
            self.stats["calls_waiting_max"] = max(self.stats["calls_waiting_max"], self.calls_waiting)
        return await loop.run_in_executor(self._pools[pool], run)

    def saturated(self) -> bool:
        """Whether the agents' calls queue so deep that a new stream's admission would wait
        longer than its agent waits for the handshake: then it is refused at once (1013, try
        later), without a trip to the database, and the streams already held keep the pool."""
        return self.calls_waiting >= settings.STREAM_ADMIT_BACKLOG

    # -- the loops --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        tune_process()
        for step in (self._renew_loop, self._nudge_loop, self._telemetry_loop, self._silence_loop, self._stats_loop,
                     self._relay_loop):  # fmt: skip
            self._tasks.append(loop.create_task(step()))
        # PostgreSQL's NOTIFY wakes the nudge loop the moment nudges commit; it polls regardless.
        self._listener = threading.Thread(
            target=streams.nudges_listen, args=(lambda: loop.call_soon_threadsafe(self._woken.set), self._stopping),
            name="stream-nudges", daemon=True,
        )  # fmt: skip
        self._listener.start()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._peers is not None:
            self._peers.close()
        await asyncio.get_running_loop().run_in_executor(None, self.release)

    def release(self) -> None:
        """Let go of the database: the LISTEN connection (its thread ends within a second) and
        the pool threads' connections."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.join(timeout=5.0)
        for name, pool in self._pools.items():
            threads = self._threads[name]
            barrier = threading.Barrier(threads, timeout=5.0)

            def close_mine(barrier=barrier):  # on every thread of the pool at once, so each closes its own
                connections.close_all()
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait()

            for _ in range(threads):
                pool.submit(close_mine)
            pool.shutdown(wait=True)

    async def _every(self, seconds: float, step, what: str) -> None:
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - an outage: the next round tries again
                logger.warning("stream_%s_failed", what, exc_info=True)
            await asyncio.sleep(seconds)

    async def _renew_loop(self) -> None:
        rounds = 0

        async def renew():
            nonlocal rounds
            now = timezone.now()
            await self.db(streams.server_renew, self.server_id, now=now, relay_address=self.relay_address, pool="hub")
            self.renewed_at = time.monotonic()
            rounds += 1
            if rounds % 30 == 1:
                await self.db(streams.prune, now=now, pool="hub")

        await self._every(settings.STREAM_LEASE_RENEW_S, renew, "lease")

    async def _nudge_loop(self) -> None:
        async def read():
            if self._last_nudge is None:
                self._last_nudge = await self.db(streams.nudges_last_id, pool="hub")
                self.nudges_read.set()
            for pk, unit_id, kind, connection in await self.db(streams.nudges_after, self._last_nudge, pool="hub"):
                self._last_nudge = pk
                stream = self.streams.get(unit_id)
                if stream is None:
                    continue
                if kind == UnitNudge.Kind.CONNECTED:
                    if connection != stream.connection and pk > stream.opened_nudge:
                        await self.close(stream, protocol.StreamClose.REPLACED, "replaced")
                else:
                    self.look(stream)

        while True:
            try:
                await read()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - an outage: the next round tries again
                logger.warning("stream_nudges_failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), settings.STREAM_NUDGE_POLL_S)
            self._woken.clear()

    async def _telemetry_loop(self) -> None:
        async def flush():
            if not self._readings:
                return
            readings, sample = self._readings, self._sample & set(self._readings)
            self._readings, self._sample = {}, set()
            await self.db(streams.telemetry_store, readings, now=timezone.now(), sample=sample, pool="hub")

        await self._every(1.0, flush, "telemetry")

    async def _silence_loop(self) -> None:
        async def sweep():
            silent_before = time.monotonic() - settings.STREAM_SILENT_S
            for stream in [s for s in self.streams.values() if s.last_beat_at < silent_before]:
                await self.close(stream, protocol.StreamClose.SILENT, "silent")

        await self._every(5.0, sweep, "silence")

    async def _relay_loop(self) -> None:
        """Take the relay's peers (requests for jobs whose streams are held here, from the other
        servers), and store the relay's traffic counts every few seconds."""
        host, _, port = settings.RELAY_PEER_BIND.rpartition(":")
        try:
            self._peers = await asyncio.start_server(
                lambda reader, writer: relay_peer.serve(self, reader, writer), host or "127.0.0.1", int(port)
            )
            bound = self._peers.sockets[0].getsockname()
            # The port as bound (each worker process of a server binds its own), the host as said.
            self.relay_address = f"{settings.RELAY_PEER_ADVERTISE or bound[0]}:{bound[1]}"
        except OSError:
            logger.warning("relay_peers_unserved: cannot listen on %s", settings.RELAY_PEER_BIND, exc_info=True)

        async def store():
            counts = self.traffic.take()
            if counts:
                await self.db(relay_access.traffic_add, counts, pool="relay")

        await self._every(5.0, store, "relay_traffic")

    async def _stats_loop(self) -> None:
        """Every STREAM_STATS_S, one log line of what this server served since the last: its
        streams, heartbeats answered from memory and in full, calls by kind, usage rounds and the
        reports they took, pushes, the deepest the calls' queue got, and the longest its event
        loop was late (every answer from memory waits for the loop)."""
        tick, started, lag_max = 0.05, time.monotonic(), 0.0
        collecting = {}

        def collected(phase: str, info: dict) -> None:  # the collector's pauses, by generation
            if phase == "start":
                collecting["at"] = time.perf_counter()
            elif "at" in collecting:
                ms = (time.perf_counter() - collecting.pop("at")) * 1000
                name = f"gc{info.get('generation')}"
                self.stats[f"{name}_ms"] += round(ms)
                self.stats[f"{name}_ms_max"] = max(self.stats[f"{name}_ms_max"], round(ms))

        gc.callbacks.append(collected)
        try:
            while True:
                before = time.monotonic()
                await asyncio.sleep(tick)
                lag_max = max(lag_max, time.monotonic() - before - tick)
                if time.monotonic() - started >= settings.STREAM_STATS_S:
                    stats, self.stats = self.stats, Counter()
                    fields = " ".join(f"{name}={stats[name]}" for name in sorted(stats))
                    logger.info(
                        "stream_stats streams=%d loop_lag_max_ms=%d %s", len(self.streams), lag_max * 1000, fields
                    )
                    started, lag_max = time.monotonic(), 0.0
        finally:
            gc.callbacks.remove(collected)

    # -- streams ---------------------------------------------------------------------------------

    async def close(self, stream: Stream, code: int, why: str) -> None:
        stream.closing = stream.closing or why
        # Bounded: an agent that stopped reading holds its stream's sends, and must not hold the
        # sweep that closes it (nor anything else waiting here).
        with contextlib.suppress(Exception):  # already gone, or stuck
            await asyncio.wait_for(stream.close_with(code), CLOSE_WAIT_S)

    async def attach(self, stream: Stream) -> None:
        older = self.streams.get(stream.unit_id)
        self.streams[stream.unit_id] = stream
        if older is not None:
            await self.close(older, protocol.StreamClose.REPLACED, "replaced")
        logger.info("stream_opened unit=%s connection=%s", stream.unit_id, stream.connection)
        self.look(stream)

    async def detach(self, stream: Stream, code: int) -> None:
        if self.streams.get(stream.unit_id) is stream:
            del self.streams[stream.unit_id]
        self.relay.stream_gone(stream)
        why = stream.closing or f"closed:{code}"
        logger.info("stream_closed unit=%s connection=%s why=%s", stream.unit_id, stream.connection, why)
        if stream.closing == "replaced" or code == SERVER_SHUTDOWN:
            return  # a newer stream has the unit, or this server is going away (its lease runs out)
        try:
            await self.db(streams.stream_lost, unit_id=stream.unit_id, connection=stream.connection,
                          now=timezone.now(), why=why)  # fmt: skip
        except Exception:  # noqa: BLE001 - the sweep judges the unit from its last sign of life
            logger.warning("stream_lost_unrecorded unit=%s", stream.unit_id, exc_info=True)

    def look(self, stream: Stream) -> None:
        """Push what the unit's agent must hear now: waiting assignments, and its state when
        it changed. Nudges arriving meanwhile make one more look, not one each."""
        if stream.looking:
            stream.look_again = True
            return
        stream.looking = True
        self.stats["looks"] += 1
        asyncio.get_running_loop().create_task(self._look(stream))

    async def _look(self, stream: Stream) -> None:
        try:
            while True:
                stream.look_again = False
                assignments, state, expected = await self.db(_look, stream.unit_id, list(stream.running), pool="push")
                if self.streams.get(stream.unit_id) is not stream:
                    return  # gone meanwhile: what was picked up, reconciliation gives back
                now = time.monotonic()
                stream.expected = expected
                for assignment in assignments:
                    stream.active_until = now + settings.STREAM_ACTIVE_HOLD_S
                    await stream.send_frame(_frame({"push": "assignment", "body": assignment}))
                pushed = {**state, "heartbeat_interval_s": stream.interval(now)}
                if stream.reply is None or _differs(pushed, stream.reply):
                    await stream.send_frame(_frame({"push": "state", "body": pushed}))
                if state["status"] not in _ALIVE:
                    stream.full_needed = True  # its next heartbeat must be the one that counts
                stream.reply = state if stream.reply is not None else None
                if not stream.look_again:
                    return
        except Exception:  # noqa: BLE001 - the next nudge, or the next full heartbeat, catches up
            logger.warning("stream_look_failed unit=%s", stream.unit_id, exc_info=True)
        finally:
            stream.looking = False

    # -- what the agent sends --------------------------------------------------------------------

    async def received(self, stream: Stream, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        if isinstance(frame, dict) and "relay" in frame:
            self.relay.agent_frame(stream, frame)
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("id"), int):
            detail = "A call is a JSON object with an integer id, a method, a path and a body."
            await self._reply(stream, None, 400, _problem(400, "Bad frame", detail))
            return
        call_id, method, path, body = frame["id"], frame.get("method"), frame.get("path"), frame.get("body")
        if not stream.admit(time.monotonic()):
            detail = f"More than {settings.STREAM_FRAMES_PER_S} calls a second over this stream."
            await self._reply(stream, call_id, 429, _problem(429, "Too many calls", detail), 1.0)
        elif method != "POST" or not isinstance(path, str) or not isinstance(body, dict):
            detail = "Calls over the stream are POSTs with a JSON object body."
            await self._reply(stream, call_id, 400, _problem(400, "Bad call", detail))
        elif path == protocol.HEARTBEAT or _ALLOCATION_CALL.fullmatch(path):
            try:
                if path == protocol.HEARTBEAT:
                    async with stream.beat_lock:
                        await self._heartbeat(stream, call_id, body)
                else:
                    await self._call(stream, call_id, path, body)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database went away mid-call: the agent retries
                logger.warning("stream_call_failed unit=%s path=%s", stream.unit_id, path, exc_info=True)
                detail = "The call could not be served now; try again."
                retry = settings.OUTAGE_RETRY_AFTER_S
                await self._reply(stream, call_id, 503, _problem(503, "Service unavailable", detail), retry)
        else:
            await self._reply(stream, call_id, 404, _problem(404, "Not found", f"No call {path!r} over the stream."))

    async def _reply(self, stream: Stream, call_id: int | None, status: int, body, retry_after=None) -> None:
        frame = {"re": call_id, "status": status, "body": body}
        if retry_after is not None:
            frame["retry_after"] = retry_after
        await stream.send_frame(_frame(frame))

    async def _call(self, stream: Stream, call_id: int, path: str, body: dict) -> None:
        if stream.calls >= settings.STREAM_CALLS_IN_FLIGHT:
            await self._reply(stream, call_id, 429, _problem(429, "Too many calls", "Wait for answers first."), 1.0)
            return
        allocation, action = path.split("/")[1:3]
        self.stats[f"calls_{action}"] += 1
        changes_running = action in ("start", "finish")
        stream.calls += 1
        if changes_running:
            stream.settling[allocation] = math.inf
        try:
            answer = await self._usage(stream, allocation, body) if action == "usage" else None
            if answer is not None:
                status, retry_after = 200, None
            else:
                status, answer, retry_after = await self.db(calls.call, stream.environ, "POST", path, body)
        finally:
            stream.calls -= 1
            if changes_running:
                # The agent's next beat, at the active cadence, says what it runs now.
                stream.settling[allocation] = time.monotonic() + 2 * settings.HEARTBEAT_INTERVAL_S
        if changes_running and status < 300:
            # The agent runs it now, or no more: its next heartbeat says so, and stays cheap.
            if action == "start":
                stream.running.add(allocation)
            else:
                stream.running.discard(allocation)
                stream.expected.pop(allocation, None)
                # Its stream is not nudged for an end it reported (nodes.services.
                # units_capacity_changed): what a beat is answered with forgets it here.
                if stream.reply is not None:
                    stream.reply = {
                        **stream.reply,
                        **{name: [a for a in stream.reply.get(name) or [] if a != allocation] for name in _STOPS},
                    }
            stream.active_until = time.monotonic() + settings.STREAM_ACTIVE_HOLD_S
        await self._reply(stream, call_id, status, answer, retry_after)

    async def _usage(self, stream: Stream, allocation: str, body: dict) -> dict | None:
        """The answer to a usage call, from the next usage round; None if it must be made alone."""
        future = asyncio.get_running_loop().create_future()
        self._usage_waiting.append((stream.credential, allocation, body, future))
        if self._usage_rounds is None:
            self._usage_rounds = asyncio.get_running_loop().create_task(self._usage_loop())
        return await future

    async def _usage_loop(self) -> None:
        """One round after another while reports wait, each taking those that wait, in their
        order, up to STREAM_USAGE_ROUND_SAMPLES samples (at least one report): the busier the
        fleet, the more each round takes."""
        try:
            while self._usage_waiting:
                taken = samples = 0
                for *_, body, _future in self._usage_waiting:
                    samples += len(body["samples"]) if isinstance(body.get("samples"), list) else 1
                    if taken and samples > settings.STREAM_USAGE_ROUND_SAMPLES:
                        break
                    taken += 1
                round_, self._usage_waiting = self._usage_waiting[:taken], self._usage_waiting[taken:]
                self.stats["usage_rounds"] += 1
                try:
                    answers = await self.db(_usage_round, [item[:3] for item in round_])
                except Exception as error:  # noqa: BLE001 - each call answers 503, as a failed call does
                    answers, failure = None, error
                for index, (*_, future) in enumerate(round_):
                    if future.done():  # its stream has gone
                        continue
                    if answers is None:
                        future.set_exception(failure)
                    else:
                        future.set_result(answers[index])
        finally:
            self._usage_rounds = None

    async def _heartbeat(self, stream: Stream, call_id: int, beat: dict) -> None:
        now = time.monotonic()
        stream.last_beat_at = now
        key, readings = _decision_key(beat), _readings(beat)
        running = beat.get("running")
        running = {str(allocation) for allocation in running} if isinstance(running, list) else None
        if "running" not in beat:
            running = set()  # as the HTTP API reads it
        # Answered from memory only while this server's lease keeps the unit seen (renewed within
        # half of UNIT_SUSPECT_AFTER), so that in a database outage the agent hears the outage
        # (a 503 from the full path), not a stale "all well".
        lease_ok = now - self.renewed_at <= settings.UNIT_SUSPECT_AFTER.total_seconds() / 2
        if readings is not None and running is not None and stream.beat_is_cheap(key, running, now, lease_ok):
            self._note_readings(stream, readings, now)
            self.stats["beats_cheap"] += 1
            metrics.HEARTBEATS.labels("stream", "cheap").inc()
            await self._reply(stream, call_id, 200, {**stream.reply, "heartbeat_interval_s": stream.interval(now)})
            return
        self.stats["beats_full"] += 1
        status, answer, retry_after = await self.db(calls.call, stream.environ, "POST", protocol.HEARTBEAT, beat)
        self.stats["beats_full_ms_max"] = max(self.stats["beats_full_ms_max"], int((time.monotonic() - now) * 1000))
        metrics.HEARTBEATS.labels("stream", "full").inc()
        metrics.HEARTBEAT_SECONDS.labels("stream").observe(time.monotonic() - now)
        if status == 200 and isinstance(answer, dict):
            if key != stream.key or not stream.running_agrees(running, now):
                stream.active_until = now + settings.STREAM_ACTIVE_HOLD_S
            stream.key, stream.reply, stream.full_at = key, dict(answer), now
            stream.running = running or set()
            stream.full_needed = answer.get("status") not in _ALIVE
            stream.expected = {a: at for a, at in stream.expected.items() if a not in stream.running}
            answer = {**answer, "heartbeat_interval_s": stream.interval(now)}
        await self._reply(stream, call_id, status, answer, retry_after)

    def _note_readings(self, stream: Stream, readings: list[dict], now: float) -> None:
        self._readings[stream.unit_id] = {"at": timezone.now().isoformat(), "gpus": readings}
        if now >= stream.sample_at:
            stream.sample_at = now + settings.STREAM_TELEMETRY_SAMPLE_S
            self._sample.add(stream.unit_id)


def _differs(state: dict, reply: dict) -> bool:
    return any(state.get(name) != reply.get(name) for name in ("status", "cancel", "preempt", "policy"))


def _look(unit_id: str, running: list) -> tuple[list[dict], dict, dict[str, float]]:
    unit = Unit.objects.get(pk=unit_id)
    assignments = []
    while len(assignments) < 64 and (assignment := use_cases.agent_assignment_next(unit=unit)) is not None:
        assignments.append(json.loads(_frame(AssignmentSerializer(assignment).data)))
    picked_up = use_cases.agent_unconfirmed(unit=unit)
    # What the agent runs: what its last full heartbeat said, and what it picked up since (a
    # cancel right after a start must not wait for the heartbeat that names the job).
    state = use_cases.agent_state(unit=unit, running=list(dict.fromkeys([*running, *picked_up])))
    return assignments, json.loads(_frame(state)), picked_up


def _usage_round(items: list[tuple[str, str, dict]]) -> list[dict | None]:
    """Answers to usage calls (credential, allocation, body), None for each to be made alone."""
    valid, at = [], []
    for credential, allocation, body in items:
        serializer = UsageSerializer(data=body)
        at.append(len(valid) if serializer.is_valid() else None)
        if at[-1] is not None:
            valid.append((credential, uuid.UUID(allocation), serializer.validated_data["samples"]))
    answers = use_cases.agent_usage_many(valid) if valid else []
    return [answers[index] if index is not None else None for index in at]


def _open(credential: str, *, server_id: str, connection: str) -> tuple[str | None, int | None]:
    """Admit a stream, in one trip to the database: (the credential's unit or None, the id of
    its "connected" nudge, or None if it may not open another stream this minute); if both,
    the unit's stream is this one now."""
    unit = unit_services.unit_authenticate(credential=credential)
    if unit is None:
        return None, None
    if not _connect_allowed(str(unit.pk)):
        return str(unit.pk), None
    return str(unit.pk), streams.stream_opened(unit_id=str(unit.pk), server_id=server_id, connection=connection)


def _connect_allowed(unit_id: str) -> bool:
    """At most STREAM_CONNECTS_PER_MIN opens per unit and minute: each one writes, and an agent
    that reconnects in a loop (or two that fight over one credential) must not hammer the
    database. Allowed when the cache is away, as the HTTP rate limits are."""
    key = f"stream-connects:{unit_id}:{int(wall_clock() // 60)}"
    try:
        cache.add(key, 0, timeout=120)
        return cache.incr(key) <= settings.STREAM_CONNECTS_PER_MIN
    except Exception:  # noqa: BLE001 - the cache is away
        return True


NUDGES_READ_WAIT_S = 10.0  # as long as the agent waits for its handshake
HUB: Hub | None = None


def hub() -> Hub:
    global HUB
    if HUB is None:
        HUB = Hub()
    return HUB


def _bearer(scope: dict) -> str:
    for name, value in scope.get("headers") or []:
        if name.lower() == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else ""
    return ""


async def stream_application(scope, receive, send) -> None:
    """The ASGI application of one agent stream."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    the_hub = hub()
    the_hub.start()
    connection = secrets.token_hex(8)

    async def refuse(code: int) -> None:  # accepted first, so the agent reads the code
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": code})

    credential = _bearer(scope)
    if the_hub.saturated():
        logger.info("stream_refused: %d calls waiting", the_hub.calls_waiting)
        await refuse(protocol.StreamClose.TRY_LATER)
        return
    try:
        unit_id, opened_nudge = await the_hub.db(_open, credential, server_id=the_hub.server_id, connection=connection)
    except Exception:  # noqa: BLE001 - the database is away: come back later, or use HTTP meanwhile
        logger.warning("stream_refused: cannot authenticate now", exc_info=True)
        await refuse(protocol.StreamClose.TRY_LATER)
        return
    if unit_id is None or opened_nudge is None:
        await refuse(protocol.StreamClose.UNAUTHORISED if unit_id is None else protocol.StreamClose.TRY_LATER)
        return
    await send({"type": "websocket.accept"})
    lock = asyncio.Lock()
    closed = False

    async def send_frame(text: str) -> None:
        if len(text) > protocol.STREAM_MAX_FRAME:
            raise ValueError("frame too large")
        nonlocal closed
        async with lock:
            if not closed:
                try:
                    await send({"type": "websocket.send", "text": text})
                except OSError:  # the agent has gone: the receive loop hears of it and detaches
                    closed = True

    async def send_bytes(data: bytes) -> None:
        nonlocal closed
        async with lock:
            if closed:
                raise ConnectionError("the stream is closed")
            try:
                await send({"type": "websocket.send", "bytes": data})
            except OSError:
                closed = True
                raise

    async def close_with(code: int) -> None:
        nonlocal closed
        async with lock:
            if not closed:
                closed = True
                await send({"type": "websocket.close", "code": code})

    now = time.monotonic()
    stream = Stream(
        unit_id=unit_id, connection=connection, environ=calls.environ_base(scope), credential=credential,
        send_frame=send_frame, close_with=close_with, send_bytes=send_bytes, opened_at=now, last_beat_at=now,
        tokens=settings.STREAM_FRAMES_PER_S * 10, tokens_at=now, opened_nudge=opened_nudge,
    )  # fmt: skip
    hello = {"connection": stream.connection, "heartbeat_interval_s": settings.HEARTBEAT_INTERVAL_S}
    code = protocol.StreamClose.TRY_LATER
    tasks: set[asyncio.Task] = set()
    try:  # from here on the unit's stream is this one: it is detached however it ends
        await send_frame(_frame({"push": "hello", "body": hello}))
        # Bounded: a database gone meanwhile ends the stream (1013), as a failed attach does.
        await asyncio.wait_for(the_hub.nudges_read.wait(), NUDGES_READ_WAIT_S)
        await the_hub.attach(stream)
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code", 1005)
                break
            text = message.get("text")
            if text is None:  # binary: a relay channel's bytes
                the_hub.relay.agent_bytes(stream, message.get("bytes") or b"")
                continue
            if len(text) > protocol.STREAM_MAX_FRAME:
                await the_hub.close(stream, protocol.StreamClose.TOO_BIG, "too_big")
                continue
            task = asyncio.get_running_loop().create_task(the_hub.received(stream, text))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except Exception:  # noqa: BLE001 - the database went away while attaching: the agent comes back
        logger.warning("stream_failed unit=%s", unit_id, exc_info=True)
        await close_with(protocol.StreamClose.TRY_LATER)
    finally:
        closed = True
        for task in tasks:
            task.cancel()
        await the_hub.detach(stream, code)


def relay_application(app):
    """``app`` with the relay's endpoints in front (marketplace/jobs/relay/endpoints.py): the
    HTTP of jobs' ports (under RELAY_HTTP_PREFIX, or at their hosts under RELAY_SERVICE_DOMAIN),
    and the forward tunnels."""

    async def application(scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and relay_endpoints.service_of(scope) is not None:
            the_hub = hub()
            the_hub.start()
            return await relay_endpoints.http_application(the_hub, scope, receive, send)
        if scope["type"] == "websocket" and relay_endpoints.FORWARD_PATH.fullmatch(path):
            the_hub = hub()
            the_hub.start()
            return await relay_endpoints.forward_application(the_hub, scope, receive, send)
        return await app(scope, receive, send)

    return application


async def shutdown() -> None:
    """The server stops: its loops end; its streams were closed with SERVER_SHUTDOWN, so their
    units keep counting as seen until its lease runs out, and their agents reconnect meanwhile."""
    if HUB is not None:
        await HUB.stop()
