"""A swarm of simulated agents for ``bench agents``: many agent streams held by one process.

Each agent speaks the stream protocol as the real one does (``nodes/agent/stream.py``,
``heartbeat.py``, ``loop.py``): it connects with its node credential, beats at once and then at
the cadence the answers (and pushed states) give, jittered ±10%, with GPUs whose temperature and
power drift; an assignment pushed to it is started, reported every USAGE_EVERY_S and finished
after a simulated run (``run_s``), or as "cancelled" as soon as it hears of a cancel (pushed, or
in a heartbeat's answer); the allocations it runs are in its heartbeats. A call unanswered after
CALL_TIMEOUT_S (where the real agent would turn to HTTP) or answered other than 2xx is an error,
and a failed heartbeat is retried with the agent's backoff. A dropped stream is an error, and is
opened again as the agent does (``Agent._hold``). It imports no Django: asyncio, websockets and json.

An agent counts as connected from the answer to its stream's first heartbeat. Agents start at
``ramp_per_s``, with at most ``ramp_pending`` of them connecting at once (see ``Swarm.run``).

    python -m marketplace.devtools.bench.swarm SPEC.json RESULTS.json

SPEC: {"ramp_per_s", "ramp_pending", "seed", "run_s"?, "agents": [{"unit", "url", "credential", "gpus":
[GpuReport...], "run_s"?}]} (``run_s``: [shortest, longest] simulated run, default RUN_S).
Prints one JSON status line a second on stdout ({"connected", "errors", "errors_by_kind", "heartbeats"}). Reads
commands on stdin: ``report`` writes RESULTS (what it measured so far) and prints
``{"reported": ...}``, ``stop`` (or SIGTERM, or stdin closing) closes every stream and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import resource
import signal
import sys
import time
from collections import Counter
from datetime import UTC, datetime

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

USAGE_EVERY_S = 10.0
RUN_S = (20.0, 90.0)  # a simulated job's run time, uniform
CALL_TIMEOUT_S = 10.0  # as the agent's client: then it would make the call over HTTP
OPEN_TIMEOUT_S = 10.0  # as the agent's stream
STREAM_RETRY_S = 60.0  # protocol.STREAM_RETRY_S: the longest wait before the next try
RECONNECT_SOON = {1001, 1012, 4408}  # the server went away or found the stream silent
RECONNECT_LATER = {4401, 4409}  # refused, or replaced by a newer stream of the unit
PING_S = 60.0  # as the real agent (protocol.STREAM_PING_S)
MAX_FRAME = 2**20 + 2**16
AGENT_VERSION = "bench-swarm"
ERROR_SAMPLES = 20


def jittered(value: float, rng: random.Random, spread: float = 0.1) -> float:
    return value * (1 - spread + 2 * spread * rng.random())


def wall_iso() -> str:
    return datetime.now(UTC).isoformat()


class Swarm:
    """What every agent of the process shares: the measurements, and whether it is stopping."""

    def __init__(self, spec: dict) -> None:
        self.ramp_per_s = float(spec.get("ramp_per_s") or 100.0)
        self.ramp_pending = int(spec.get("ramp_pending") or 50)
        self.run_s = tuple(spec.get("run_s") or RUN_S)
        self.rng = random.Random(spec.get("seed", 0))
        self.agents = [Agent(self, agent, random.Random(self.rng.getrandbits(64))) for agent in spec["agents"]]
        self.stopping = asyncio.Event()
        self.connected = 0  # streams open whose first heartbeat was answered
        self.established: dict[str, float] = {}  # unit -> wall time its stream first got a heartbeat answered
        self.beat_at: list[float] = []  # wall time each answered heartbeat was sent
        self.beat_ms: list[float] = []  # its round trip
        self.assigned: dict[str, float] = {}  # allocation id -> wall time its assignment arrived
        self.cancelled: dict[str, tuple[float, str]] = {}  # allocation id -> (wall time heard, "push"|"reply")
        self.errors: Counter = Counter()
        self.error_samples: list[str] = []
        self.drops: dict[str, list[float]] = {}  # unit -> wall times its stream dropped unasked
        self.calls: Counter = Counter()

    def error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(f"{kind} {detail}"[:300])

    def results(self) -> dict:
        return {
            "agents": len(self.agents),
            "connected": self.connected,
            "established": self.established,
            "hb_at": [round(t, 3) for t in self.beat_at],
            "hb_ms": [round(ms, 2) for ms in self.beat_ms],
            "assigned": self.assigned,
            "cancelled": {a: list(v) for a, v in self.cancelled.items()},
            "errors": dict(self.errors),
            "error_samples": self.error_samples,
            "drops": self.drops,
            "calls": dict(self.calls),
        }

    async def run(self) -> None:
        tasks: list[asyncio.Task] = []
        ramp = asyncio.create_task(self._ramp(tasks))
        await self.stopping.wait()
        ramp.cancel()
        await asyncio.gather(*(agent.close() for agent in self.agents), return_exceptions=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(ramp, *tasks, return_exceptions=True)

    async def _ramp(self, tasks: list[asyncio.Task]) -> None:
        """Start the agents at ramp_per_s, in small groups, with at most ramp_pending of them
        between their first connect and their first answered heartbeat: a server slower than
        the ramp sets the pace instead of a queue of first heartbeats timing out."""
        slots = asyncio.Semaphore(self.ramp_pending)
        batch = max(1, int(self.ramp_per_s / 20))  # 20 groups a second
        for start in range(0, len(self.agents), batch):
            group = self.agents[start : start + batch]
            for agent in group:
                await slots.acquire()
                tasks.append(asyncio.create_task(agent.hold(slots.release)))
            await asyncio.sleep(len(group) / self.ramp_per_s)


class Agent:
    """One simulated shed and its stream."""

    def __init__(self, swarm: Swarm, spec: dict, rng: random.Random) -> None:
        self.swarm, self.rng = swarm, rng
        self.unit, self.url = spec["unit"], spec["url"]
        self.run_s = tuple(spec.get("run_s") or swarm.run_s)
        self.headers = {"Authorization": f"Bearer {spec['credential']}"}
        self.gpus = [{**gpu, "healthy": True, "temperature_c": rng.randint(35, 60), "power_w": 80.0}
                     for gpu in spec["gpus"]]  # fmt: skip
        self.ws = None
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.up = asyncio.Event()
        self.interval_s = 5.0
        self.next_at = 0.0
        self.failures = 0
        self.established = False
        self.ramped = None
        self.wake = asyncio.Event()
        self.jobs: dict[str, asyncio.Event] = {}  # allocation id -> its cancel
        self.running: list[str] = []  # started, not finished

    # -- the stream ------------------------------------------------------------------------------

    async def hold(self, ramped) -> None:
        """Hold the stream, opening it again after a drop; ``ramped()`` is called once, when its
        first heartbeat is answered (or the agent stops)."""
        self.ramped = ramped
        try:
            await self._hold()
        finally:
            self._ramped()

    def _ramped(self) -> None:
        ramped, self.ramped = self.ramped, None
        if ramped is not None:
            ramped()

    async def _hold(self) -> None:
        """The real agent's reconnects: soon after a server went away, after STREAM_RETRY_S when
        replaced or refused, else with exponential backoff (equal jitter) up to STREAM_RETRY_S,
        reset by a hello."""
        swarm = self.swarm
        failures = 0
        while not swarm.stopping.is_set():
            code = None
            try:
                async with connect(
                    self.url, additional_headers=self.headers, user_agent_header=AGENT_VERSION, proxy=None,
                    open_timeout=OPEN_TIMEOUT_S, ping_interval=PING_S, ping_timeout=PING_S, close_timeout=5,
                    max_size=MAX_FRAME, compression=None,
                ) as ws:  # fmt: skip
                    if await self._session(ws):
                        failures = 0
                code = ws.close_code
            except (OSError, TimeoutError, InvalidStatus, WebSocketException) as exc:
                if not swarm.stopping.is_set():
                    swarm.error(f"connect:{type(exc).__name__}", f"{self.unit} {exc}")
            if swarm.stopping.is_set():
                return
            if code in RECONNECT_SOON:
                delay = jittered(1.0, self.rng, 0.5)
            elif code in RECONNECT_LATER:
                delay = STREAM_RETRY_S
            else:
                delay = min(STREAM_RETRY_S, 2.0**failures) * (0.5 + self.rng.random() / 2)
                failures = min(failures + 1, 30)
            await asyncio.sleep(delay)

    async def _session(self, ws) -> bool:
        """Serve one connection until it ends; whether it said hello."""
        swarm = self.swarm
        hello = json.loads(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT_S))
        if hello.get("push") != "hello":
            swarm.error("hello", f"{self.unit} {str(hello)[:200]}")
            return False
        self.interval_s = float(hello["body"].get("heartbeat_interval_s") or 5)
        self.ws, self.next_at, self.established = ws, 0.0, False
        self.up.set()
        reader = asyncio.create_task(self._read(ws))
        try:
            await self._beat_loop(reader)
        finally:
            if self.established:
                swarm.connected -= 1
            self.up.clear()
            self.ws = None
            reader.cancel()
            for future in self.pending.values():
                future.cancel()
            self.pending.clear()
            if not swarm.stopping.is_set():
                swarm.error(f"closed:{ws.close_code}", self.unit)
                if self.established:
                    swarm.drops.setdefault(self.unit, []).append(time.time())
        return True

    async def _read(self, ws) -> None:
        try:
            async for text in ws:
                heard = time.time()
                frame = json.loads(text)
                if "re" in frame:
                    future = self.pending.pop(frame["re"], None)
                    if future is not None and not future.done():
                        future.set_result(frame)
                elif frame.get("push") == "assignment":
                    self._assigned(frame["body"], heard)
                elif frame.get("push") == "state":
                    self._state(frame["body"], heard, "push")
                    self.next_at = min(self.next_at, time.monotonic() + jittered(self.interval_s, self.rng))
                    self.wake.set()
        except ConnectionClosed:
            pass

    async def close(self) -> None:
        ws = self.ws
        if ws is not None:
            await ws.close()

    async def call(self, path: str, body: dict) -> tuple[int, object, float]:
        """One call over the stream, waiting for the stream if it is down: (status, body,
        Retry-After or 0); status 0 if no answer came."""
        kind = path.rsplit("/", 1)[-1]
        swarm = self.swarm
        swarm.calls[kind] += 1
        call_id = next(self.ids)
        try:
            await asyncio.wait_for(self.up.wait(), CALL_TIMEOUT_S)
            future = asyncio.get_running_loop().create_future()
            self.pending[call_id] = future
            await self.ws.send(json.dumps({"id": call_id, "method": "POST", "path": path, "body": body}))
            frame = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError, ConnectionClosed, AttributeError) as exc:
            if swarm.stopping.is_set():
                raise asyncio.CancelledError from None
            swarm.error(f"{kind}:no_answer", f"{self.unit} {type(exc).__name__}")
            return 0, None, 0.0
        finally:
            self.pending.pop(call_id, None)
        status = frame.get("status", 0)
        if not 200 <= status < 300:
            swarm.error(f"{kind}:{status}", f"{self.unit} {str(frame.get('body'))[:200]}")
        return status, frame.get("body"), float(frame.get("retry_after") or 0.0)

    # -- heartbeats ------------------------------------------------------------------------------

    async def _beat_loop(self, reader: asyncio.Task) -> None:
        swarm = self.swarm
        while not reader.done():
            delay = self.next_at - time.monotonic()
            if delay > 0:
                self.wake.clear()
                waiter = asyncio.create_task(self.wake.wait())
                done, _ = await asyncio.wait({waiter, reader}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                continue
            for gpu in self.gpus:
                gpu["temperature_c"] = max(30, min(85, gpu["temperature_c"] + self.rng.randint(-2, 2)))
                busy = 600.0 if self.running else 80.0
                gpu["power_w"] = round(busy + self.rng.uniform(-20, 20), 1)
            beat = {"gpus": self.gpus, "running": list(self.running), "agent_version": AGENT_VERSION}
            sent_wall, sent = time.time(), time.perf_counter()
            self.next_at = time.monotonic() + jittered(self.interval_s, self.rng)
            status, reply, retry_after = await self.call("heartbeat", beat)
            if status == 200 and isinstance(reply, dict):
                swarm.beat_at.append(sent_wall)
                swarm.beat_ms.append((time.perf_counter() - sent) * 1000)
                if not self.established:
                    self.established = True
                    swarm.connected += 1
                    swarm.established.setdefault(self.unit, time.time())
                    self._ramped()
                self._state(reply, time.time(), "reply")
                self.interval_s = max(0.1, float(reply.get("heartbeat_interval_s") or self.interval_s))
                self.next_at = time.monotonic() + jittered(self.interval_s, self.rng)
                self.failures = 0
            else:
                # The agent's error cadence: exponential backoff with equal jitter, never slower
                # than the normal cadence, at least what the server asked.
                delay = min(self.interval_s, 2.0**self.failures)
                self.failures = min(self.failures + 1, 30)
                self.next_at = time.monotonic() + max(retry_after, delay * (0.5 + self.rng.random() / 2))

    def _state(self, state: dict, heard: float, via: str) -> None:
        for allocation in [*(state.get("cancel") or []), *(state.get("preempt") or [])]:
            allocation = str(allocation)
            cancel = self.jobs.get(allocation)
            if cancel is not None and not cancel.is_set():
                self.swarm.cancelled.setdefault(allocation, (heard, via))
                cancel.set()
        if via == "push" and state.get("heartbeat_interval_s"):
            self.interval_s = max(0.1, float(state["heartbeat_interval_s"]))

    # -- jobs ------------------------------------------------------------------------------------

    def _assigned(self, assignment: dict, heard: float) -> None:
        allocation = str(assignment["allocation_id"])
        if allocation in self.jobs or allocation in self.swarm.assigned:
            return
        self.swarm.assigned[allocation] = heard
        self.jobs[allocation] = asyncio.Event()
        asyncio.get_running_loop().create_task(self._job(allocation, max(1, len(assignment.get("gpus") or []))))

    async def _job(self, allocation: str, gpus: int) -> None:
        cancel = self.jobs[allocation]
        try:
            status, _, _ = await self.call(f"allocations/{allocation}/start", {})
            if status != 200:
                await self.call(f"allocations/{allocation}/finish", {"exit_code": None, "reason": "start_failed"})
                return
            self.running.append(allocation)
            started = last = time.monotonic()
            ends = started + self.rng.uniform(*self.run_s)
            seq = 0
            while not cancel.is_set() and time.monotonic() < ends:
                timeout = min(last + USAGE_EVERY_S, ends) - time.monotonic()
                if timeout > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(cancel.wait(), timeout)
                now = time.monotonic()
                if now - last >= USAGE_EVERY_S or cancel.is_set() or now >= ends:
                    seq += 1
                    sample = {"seq": seq, "gpu_ms": int((now - last) * 1000) * gpus, "recorded_at": wall_iso()}
                    last = now
                    await self.call(f"allocations/{allocation}/usage", {"samples": [sample]})
            reason, code = ("cancelled", 143) if cancel.is_set() else ("exited", 0)
            self.jobs.pop(allocation, None)  # ended: a cancel heard from now on is not this job's
            await self.call(f"allocations/{allocation}/finish", {"exit_code": code, "reason": reason})
        except asyncio.CancelledError:
            return
        finally:
            if allocation in self.running:
                self.running.remove(allocation)
            self.jobs.pop(allocation, None)


def _raise_open_files(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < need:
        sys.exit(f"swarm: {need} open files needed, the hard limit is {hard} (raise it: ulimit -Hn)")


def _emit(data: dict) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def main(spec_path: str, results_path: str) -> None:
    with open(spec_path) as spec_file:
        spec = json.load(spec_file)
    _raise_open_files(len(spec["agents"]) + 256)
    swarm = Swarm(spec)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, swarm.stopping.set)
    loop.add_signal_handler(signal.SIGINT, swarm.stopping.set)

    def command() -> None:
        line = sys.stdin.readline()
        if line.strip() == "report":
            with open(results_path, "w") as out:
                json.dump(swarm.results(), out)
            _emit({"reported": results_path})
        elif not line or line.strip() == "stop":
            loop.remove_reader(sys.stdin.fileno())
            swarm.stopping.set()

    loop.add_reader(sys.stdin.fileno(), command)

    async def status() -> None:
        while True:
            errors = sum(swarm.errors.values())
            _emit({"connected": swarm.connected, "errors": errors, "errors_by_kind": dict(swarm.errors),
                   "heartbeats": len(swarm.beat_at)})  # fmt: skip
            await asyncio.sleep(1.0)

    reporter = asyncio.create_task(status())
    try:
        await swarm.run()
    finally:
        reporter.cancel()
    _emit({"stopped": True})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
