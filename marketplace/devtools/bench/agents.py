"""Agent streams at scale: the production processes serving ``--units`` simulated agents at once.

What runs, each its own process on this machine: the connection server(s) (``uvicorn
marketplace.asgi:application``, ``--connection-servers`` of them, each on its own port and
holding its share of the streams), gunicorn with uvicorn workers for the renter API
(``devstack.web_argv``), a Celery worker of two processes and beat, a private ``redis-server`` on
a free port (broker, cache and rate limits: a shared Redis database would hand this worker other
people's tasks), PostgreSQL (the configured server, a scratch database that is dropped at the
end), and the swarm: ``--swarm-processes`` processes of ``swarm.py``, each holding many streams
that behave as the real agent does (see its docstring). The children run the production settings
(DEBUG off, plain HTTP on 127.0.0.1) with the renter API's rate limits raised, so that one
benchmark renter may submit at ``--rate``; everything else (cadences, leases, liveness) is left
at its defaults.

The phases, each timed by this process's wall clock (the swarm stamps what it measures with the
same clock):

1. setup: the synthetic marketplace of ``bench placement`` (all units online, every GPU sold
   whole) plus a node credential per unit, made as enrolment makes them, and 127.0.0.1 as each
   unit's known address (a fleet reconnecting, not one enrolling); then ``pgbench_tps`` on the
   scratch database, before any process of the stack starts.
2. ramp: the swarm opens its streams at up to ``--ramp-per-s`` in all, with at most
   ``--ramp-pending`` agents between connecting and the answer to their first heartbeat (a full
   one), so that a server slower than the ramp sets its pace; until every agent is connected
   (its first heartbeat answered: ``ramp_s``), or ``--ramp-timeout`` passed (``ramp_complete``
   false: measured anyway). Beat, and with it the liveness sweep, starts then: the units'
   liveness is judged from then on, from their streams alone.
3. settle: STREAM_ACTIVE_HOLD_S + HEARTBEAT_INTERVAL_S, so that every stream is at its idle cadence.
4. idle: ``--idle`` seconds with no work. A stream's periodic full heartbeat (every
   STREAM_FULL_BEAT_S, reported as ``full_beat_s``) falls in it only if the window is at least
   that long, so ``db_writes_per_heartbeat`` is the steady idle figure only then.
5. busy: ``--duration`` seconds of renters submitting at ``--rate`` through the REST API (mostly
   one-GPU jobs, ``SUBMITTERS`` clients), a tenth of the jobs cancelled CANCEL_AFTER_S after their
   submit (by then they have started: the swarm's jobs run 20–90 s), until the last cancel is
   answered and a little over HEARTBEAT_IDLE_INTERVAL_S more, so that a cancel that only a
   heartbeat's answer brings is heard.

Reported: ``connected_agents`` (the fewest connected at any second of idle and busy), heartbeat
round trips (sent to answer, as the agent sees them) over idle and busy together, and
``heartbeats_per_s``; ``assignment_push_*``: the agent's receipt of the pushed assignment minus
the allocation's ``created_at``, which is stamped inside the placing transaction before its
commit, so this slightly overstates the time from commit; ``cancel_push_*``: when the agent first
heard of the cancel (pushed, or in a heartbeat's answer: ``cancels_heard_by`` says which) minus
when the cancel call returned to the renter (a push that beats the answer counts as 0);
``db_writes_per_heartbeat`` (idle) and ``_busy``: the scratch database's inserted, updated and
deleted rows (``pg_stat_user_tables``, so also beat's sweeps and the lease renewals) over the
heartbeats answered in the window, with the tables that took most (``db_writes_idle_by_table``);
PostgreSQL publishes these counters up to a second late, which the windows' length makes small.
``busy_cores_by_process``: the cores each of the stack's processes (with its children: gunicorn's
and Celery's workers), the swarm and PostgreSQL took over busy, busiest first: where the machine
went. ``server_rss_mb`` is the connection servers' resident memory at the end of busy,
``server_cpu_s_per_1000_heartbeats`` their user+system CPU over idle and busy per 1000 heartbeats.
``falsely_suspect``: units judged suspect or offline between the start of beat and the end of
busy whose agent's stream was up before and never dropped; ``lease_age_max_s``: the oldest the
connection servers' lease got over that time, read every second (their units count as seen up
to its renewal, so near UNIT_SUSPECT_AFTER it makes false suspects). ``errors``: the swarm's
(answers other than 2xx, calls unanswered, streams closed unasked, failed connects) plus the
renter calls answered other than 2xx, from the end of the ramp on; ``errors_by_kind`` says which.
During the ramp a server whose calls queue deep refuses new streams (1013: try later, as
STREAM_ADMIT_BACKLOG says) and the agents come back: ``ramp_errors_by_kind`` counts those apart.

``--hold S`` keeps everything running S seconds after the measurement (``holding`` on stderr), so
that another benchmark can run beside the connected agents. At the end, or on Ctrl-C, every child
process is stopped and the scratch database dropped; the children's logs are kept in ``logs``.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from django.conf import settings
from django.core.management.base import CommandError
from django.db import connection

from marketplace.devtools import devstack
from marketplace.devtools.bench.placement import _percentiles, database_url, pgbench_tps, populate, scratch_database

HELP = "Simulated agents on streams against the real web stack: heartbeat and push latency, db writes, CPU."
SUBMITTERS = 8  # renter API clients submitting at once
CANCEL_FRACTION = 0.1
CANCEL_AFTER_S = 10.0
STARTUP_S = 300.0
GANGS = [(1, 80), (2, 15), (4, 5)]  # job GPU counts and their weights: mostly one GPU
WORKER_PROCESSES = 2
WEB_WORKERS = 2
WRITE_TABLES_SHOWN = 8
ERROR_SAMPLES = 8


def add_arguments(parser) -> None:
    parser.add_argument("--units", type=int, default=10_000, help="units, one simulated agent each")
    parser.add_argument("--gpus-per-unit", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of submitting jobs")
    parser.add_argument("--rate", type=float, default=20.0, help="job submits per second")
    parser.add_argument("--idle", type=float, default=120.0, help="seconds of the idle window")
    parser.add_argument("--swarm-processes", type=int, default=None, help="default: one per 5,000 agents")
    parser.add_argument(
        "--connection-servers", type=int, default=None, help="default: one per CPU (each is one event loop)"
    )
    parser.add_argument("--ramp-per-s", type=float, default=200.0, help="new streams per second, all together")
    parser.add_argument(
        "--ramp-pending", type=int, default=100, help="at most this many agents between connect and first answer"
    )
    parser.add_argument(
        "--ramp-timeout", type=float, default=900.0, help="seconds to wait for every agent; then measure anyway"
    )
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep everything up after measuring")
    parser.add_argument("--pgbench-seconds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep-database", action="store_true", help="leave the scratch database for inspection")


def run(**options) -> dict:
    if connection.vendor != "postgresql":
        raise CommandError("bench agents needs PostgreSQL: set DATABASE_URL to a PostgreSQL server.")
    units = options["units"]
    swarms = options["swarm_processes"] or max(1, math.ceil(units / 5000))
    servers = options["connection_servers"] or os.cpu_count() or 1
    if min(units, swarms, servers, options["gpus_per_unit"]) < 1 or options["rate"] <= 0:
        raise CommandError("--units, --gpus-per-unit, --swarm-processes, --connection-servers and --rate must be > 0.")
    _open_files(math.ceil(units / min(swarms, servers)) + 1024)
    idle_s = options["idle"]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    handlers = _interrupt_once()
    try:
        with scratch_database(keep=options["keep_database"]) as database:
            return _bench(options, database, log_dir, swarms=swarms, servers=servers, idle_s=idle_s)
    except KeyboardInterrupt:
        database = "kept" if options["keep_database"] else "dropped"
        raise CommandError(
            f"Interrupted: every process stopped, the scratch database {database}; logs in {log_dir}."
        ) from None
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _bench(options: dict, database: dict, log_dir: Path, *, swarms: int, servers: int, idle_s: float) -> dict:
    from marketplace.accounts.services import api_key_create

    logging.getLogger("httpx").setLevel(logging.WARNING)
    rng = random.Random(options["seed"])
    renter = populate(rng, options["units"], options["gpus_per_unit"])
    agents = _agents()
    keys = [api_key_create(user=renter, name=f"bench {n}")[1] for n in range(SUBMITTERS)]
    tps = pgbench_tps(database, seconds=options["pgbench_seconds"], clients=4)
    stack = devstack.Stack(env=dict(os.environ), log_dir=log_dir)
    swarm = leases = None
    try:
        redis_url = _redis_start(stack)
        stack.env = _environ(database, redis_url, log_dir)
        ports = [_free_port() for _ in range(servers)]
        for n, port in enumerate(ports):
            stack.start(f"connections-{n}", _connection_server_argv(port))
        web_port = _free_port()
        stack.start("web", devstack.web_argv(web_port, workers=WEB_WORKERS))
        stack.start("worker", devstack.worker_argv(concurrency=WORKER_PROCESSES, name=f"bench-{os.getpid()}"))
        for port in ports:
            devstack.wait_http(f"http://127.0.0.1:{port}/", timeout=STARTUP_S)
        devstack.wait_http(f"http://127.0.0.1:{web_port}/", timeout=STARTUP_S)
        _wait_log(stack, "worker", "Capacity view built", WORKER_PROCESSES)

        urls = [f"ws://127.0.0.1:{port}/api/agent/v1/stream" for port in ports]
        for n, agent in enumerate(agents):
            agent["url"] = urls[n % len(urls)]
        swarm = Swarm(agents, swarms, options, log_dir)
        ramp_started = time.time()
        ramp_complete = swarm.wait_connected(len(agents), timeout=options["ramp_timeout"])
        ramp_s = time.time() - ramp_started
        ramp_errors = swarm.errors_by_kind()  # a server refusing streams while it admits others is by design
        stack.start("beat", devstack.beat_argv(log_dir / "celerybeat-schedule"))
        judged_from = time.time()
        leases = LeaseWatch()
        time.sleep(settings.STREAM_ACTIVE_HOLD_S + settings.HEARTBEAT_INTERVAL_S)

        pids = [stack.processes[f"connections-{n}"].pid for n in range(servers)]
        groups = {name: [process.pid] for name, process in stack.processes.items()}
        groups["swarm"] = [process.pid for process in swarm.processes]
        idle = Window.open(pids)
        time.sleep(idle_s)
        idle.close()
        busy = Window.open(pids)
        cpu_before = _cpu_by_group(groups)
        load = _load(f"http://127.0.0.1:{web_port}", keys, rng, rate=options["rate"], duration=options["duration"])
        # Long enough for a cancel that only a heartbeat's answer brings to be heard.
        time.sleep(settings.HEARTBEAT_IDLE_INTERVAL_S * 1.1 + 2)
        busy.close()
        cpu_after = _cpu_by_group(groups)
        lease_age_max_s = leases.stop()
        rss_mb = sum(_rss_mb(pid) for pid in pids)
        measured = swarm.report()
        measured["errors"] = Counter(measured["errors"])
        measured["errors"].subtract(ramp_errors)
        result = _summarise(measured, load, idle, busy, swarm.connected_between(idle.start, busy.end), judged_from)
        result.update(
            lease_age_max_s=lease_age_max_s,
            server_rss_mb=round(rss_mb, 1),
            pgbench_tps=tps,
            pgbench_when="before the stack started, on the scratch database",
            units=options["units"],
            gpus=options["units"] * options["gpus_per_unit"],
            cpus=os.cpu_count(),
            swarm_processes=swarms,
            connection_servers=servers,
            busy_cores_by_process={
                name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / (busy.end - busy.start), 2)
                for name in sorted(cpu_after, key=lambda name: -(cpu_after[name] - cpu_before.get(name, 0.0)))
            },
            ramp_s=round(ramp_s, 1),
            ramp_complete=ramp_complete,
            ramp_errors_by_kind=dict(ramp_errors),
            idle_s=idle_s,
            full_beat_s=settings.STREAM_FULL_BEAT_S,
            duration_s=options["duration"],
            rate=options["rate"],
            logs=str(log_dir),
        )
        if options["hold"] > 0:
            print("holding", file=sys.stderr, flush=True)
            time.sleep(options["hold"])
        return result
    finally:
        if leases is not None:
            leases.stop()
        _stop(stack, swarm)


# -- the marketplace's side -------------------------------------------------------------------------


def _agents() -> list[dict]:
    """Give every unit a node credential, as enrolment does (stored as lookup + HMAC), and return
    what each simulated agent needs: its unit, credential and GPU inventory as the database has it."""
    from marketplace.kernel import tokens
    from nodes.models import GPU, Unit
    from nodes.services import NODE_CREDENTIAL_KIND

    agents, rows = {}, []
    for unit_id in Unit.objects.order_by("name").values_list("pk", flat=True):
        issued = tokens.token_issue(NODE_CREDENTIAL_KIND)
        rows.append((issued.lookup, issued.digest, unit_id))
        agents[str(unit_id)] = {"unit": str(unit_id), "credential": issued.plaintext, "gpus": []}
    # The agents call from 127.0.0.1, taken as already seen: a fleet that reconnects, not one
    # enrolling (whose first heartbeats would also observe and judge each unit's address).
    with connection.cursor() as cursor:
        cursor.executemany(
            "UPDATE nodes_unit SET credential_lookup = %s, credential_digest = %s, observed_ip = '127.0.0.1', "
            "observed_country = '', observed_at = now() WHERE id = %s",
            rows,
        )
    inventory = GPU.objects.order_by("unit_id", "index").values_list(
        "unit_id", "index", "device_uuid", "model", "vram_mb", "driver_version", "cuda_version"
    )
    for unit_id, index, uuid, model, vram_mb, driver, cuda in inventory:
        agents[str(unit_id)]["gpus"].append({"index": index, "uuid": uuid, "model": model, "vram_mb": vram_mb,
                                             "driver_version": driver, "cuda_version": cuda})  # fmt: skip
    return list(agents.values())


def _job_spec(rng: random.Random) -> dict:
    gang = rng.choices([g for g, _ in GANGS], weights=[w for _, w in GANGS])[0]
    return {"name": "bench", "image": "ghcr.io/acme/train:1", "command": ["python", "train.py"], "gpu_count": gang,
            "max_duration_s": 3600}  # fmt: skip


class Load:
    """Renters submitting at a fixed rate over the REST API, and cancelling some of their jobs."""

    def __init__(self, base_url: str, keys: list[str]) -> None:
        self.clients = [httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
                        for key in keys]  # fmt: skip
        self.lock = threading.Lock()
        self.submitted: dict[str, float] = {}  # job id -> when the submit returned
        self.cancelled: dict[str, float] = {}  # job id -> when the cancel returned
        self.errors: Counter = Counter()
        self.error_samples: list[str] = []
        self.due: list[tuple[float, str]] = []  # (when, job id) of the cancels to make

    def post(self, n: int, path: str, **kwargs) -> httpx.Response | None:
        try:
            response = self.clients[n % len(self.clients)].post(path, **kwargs)
        except httpx.HTTPError as exc:
            with self.lock:
                self.errors[f"renter:{type(exc).__name__}"] += 1
            return None
        if not 200 <= response.status_code < 300:
            kind = f"renter:{path.split('/')[-1] or 'submit'}:{response.status_code}"
            with self.lock:
                self.errors[kind] += 1
                if len(self.error_samples) < ERROR_SAMPLES:
                    self.error_samples.append(f"{kind} {path} {response.text[:200]}")
            return None
        return response

    def submit(self, n: int, spec: dict, cancel: bool) -> None:
        response = self.post(n, "/api/v1/jobs", json=spec)
        if response is None:
            return
        job, now = response.json()["id"], time.time()
        with self.lock:
            self.submitted[job] = now
            if cancel:
                heapq.heappush(self.due, (now + CANCEL_AFTER_S, job))

    def cancel(self, n: int, job: str) -> None:
        if self.post(n, f"/api/v1/jobs/{job}/cancel") is not None:
            with self.lock:
                self.cancelled[job] = time.time()

    def next_cancel(self) -> str | None:
        with self.lock:
            if self.due and self.due[0][0] <= time.time():
                return heapq.heappop(self.due)[1]
        return None


def _load(base_url: str, keys: list[str], rng: random.Random, *, rate: float, duration: float) -> Load:
    load = Load(base_url, keys)
    count = int(rate * duration)
    plan = [(_job_spec(rng), rng.random() < CANCEL_FRACTION) for _ in range(count)]
    started = time.perf_counter()
    submitting = True

    def submit(n: int) -> None:
        # Each submit at its own moment on the clock, as independent renters send them.
        time.sleep(max(0.0, started + n / rate - time.perf_counter()))
        load.submit(n, *plan[n])

    # The cancels have a pool of their own: every submit is queued at the start, each waiting for
    # its moment, and a cancel queued behind them would go out only after the last submit.
    with (
        ThreadPoolExecutor(max_workers=SUBMITTERS * 2) as pool,
        ThreadPoolExecutor(max_workers=SUBMITTERS) as cancel_pool,
    ):

        def cancels() -> None:
            n, pending = 0, []
            while submitting or load.due:
                job = load.next_cancel()
                if job is None:
                    time.sleep(0.05)
                    continue
                pending.append(cancel_pool.submit(load.cancel, n, job))
                n += 1
            for future in pending:
                future.result()

        canceller = threading.Thread(target=cancels, daemon=True)
        canceller.start()
        list(pool.map(submit, range(count)))
        submitting = False
        canceller.join()
    for client in load.clients:
        client.close()
    return load


# -- measuring ------------------------------------------------------------------------------------


class Window:
    """A stretch of the run: its wall-clock bounds, the database's row writes and the connection
    servers' CPU over it."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = self.end = 0.0
        self.writes: dict[str, int] = {}
        self.cpu_s = 0.0

    @classmethod
    def open(cls, pids: list[int]) -> Window:
        window = cls(pids)
        window.start, window.writes, window.cpu_s = time.time(), _table_writes(), _cpu_s(pids)
        return window

    def close(self) -> None:
        writes = _table_writes()
        self.writes = {table: n - self.writes.get(table, 0) for table, n in writes.items()}
        self.writes = {table: n for table, n in self.writes.items() if n}
        self.cpu_s = _cpu_s(self.pids) - self.cpu_s
        self.end = time.time()


class LeaseWatch:
    """The age of the connection servers' leases, read every second: the units a server holds
    count as seen up to its last renewal, so an age near UNIT_SUSPECT_AFTER means false suspects."""

    def __init__(self) -> None:
        self.oldest = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        try:
            while not self.stopping.wait(1.0):
                with connection.cursor() as cursor:
                    cursor.execute("SELECT extract(epoch FROM max(now() - renewed_at)) FROM nodes_streamserver")
                    self.oldest = max(self.oldest, float(cursor.fetchone()[0] or 0.0))
        finally:
            connection.close()

    def stop(self) -> float:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()
        return round(self.oldest, 1)


def _table_writes() -> dict[str, int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables")
        return dict(cursor.fetchall())


def _cpu_s(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _cpu_by_group(groups: dict[str, list[int]]) -> dict[str, float]:
    """User+system CPU seconds of each group's processes and all their descendants (gunicorn's
    and Celery's workers, uvicorn), and of PostgreSQL's processes as ``postgres``: where a busy
    machine's cores go. A process that ended meanwhile takes its seconds with it (a closed
    PostgreSQL backend), so the figures are a lower bound."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent, cpu, postgres = {}, {}, []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as stat:
                head, tail = stat.read().rsplit(")", 1)
            fields = tail.split()
            pid = int(entry)
            parent[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks
            if head.endswith("(postgres"):
                postgres.append(pid)
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)

    def tree(pid: int) -> float:
        return cpu.get(pid, 0.0) + sum(tree(child) for child in children.get(pid, []))

    totals = {name: sum(tree(pid) for pid in pids) for name, pids in groups.items()}
    totals["postgres"] = sum(cpu[pid] for pid in postgres)
    return totals


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _summarise(measured: dict, load: Load, idle: Window, busy: Window, connected: int, judged_from: float) -> dict:
    from marketplace.jobs.models import Allocation

    at, ms = measured["hb_at"], measured["hb_ms"]

    def beats(window: Window) -> list[float]:
        return [m for t, m in zip(at, ms, strict=True) if window.start <= t < window.end]

    idle_beats, busy_beats = beats(idle), beats(busy)
    both = idle_beats + busy_beats
    seconds = (idle.end - idle.start) + (busy.end - busy.start)
    placed = Allocation.objects.filter(job_id__in=list(load.submitted))
    allocations = list(placed.values_list("pk", "job_id", "created_at"))
    pushes, unheard = [], 0
    for pk, _, created in allocations:
        heard = measured["assigned"].get(str(pk))
        if heard is None:
            unheard += 1
        else:
            pushes.append((heard - created.timestamp()) * 1000)
    allocation_of = {str(job): str(pk) for pk, job, _ in sorted(allocations, key=lambda row: row[2])}
    cancel_ms, heard_by, cancels_unheard, cancelled_queued = [], Counter(), 0, 0
    for job, returned in load.cancelled.items():
        allocation = allocation_of.get(job)
        if allocation is None:
            cancelled_queued += 1
        elif allocation in measured["cancelled"]:
            heard, via = measured["cancelled"][allocation]
            cancel_ms.append(max(0.0, heard - returned) * 1000)
            heard_by[via] += 1
        else:
            cancels_unheard += 1
    errors = +(Counter(measured["errors"]) + load.errors)  # errors since the ramp, by kind
    hb, push, cancel = _percentiles(both), _percentiles(pushes), _percentiles(cancel_ms)
    return {
        "connected_agents": connected,
        "heartbeats_per_s": round(len(both) / seconds, 1) if seconds else None,
        "heartbeat_p50_ms": hb["p50_ms"],
        "heartbeat_p99_ms": hb["p99_ms"],
        "heartbeat_p99_ms_idle": _percentiles(idle_beats)["p99_ms"],
        "heartbeat_p99_ms_busy": _percentiles(busy_beats)["p99_ms"],
        "assignment_push_p50_ms": push["p50_ms"],
        "assignment_push_p99_ms": push["p99_ms"],
        "cancel_push_p50_ms": cancel["p50_ms"],
        "cancel_push_p99_ms": cancel["p99_ms"],
        "cancels_heard_by": dict(heard_by),
        "db_writes_per_heartbeat": _per(sum(idle.writes.values()), len(idle_beats)),
        "db_writes_per_heartbeat_busy": _per(sum(busy.writes.values()), len(busy_beats)),
        "db_writes_idle_by_table": dict(Counter(idle.writes).most_common(WRITE_TABLES_SHOWN)),
        "server_cpu_s_per_1000_heartbeats": _per((idle.cpu_s + busy.cpu_s) * 1000, len(both)),
        "server_cpu_s_per_1000_heartbeats_idle": _per(idle.cpu_s * 1000, len(idle_beats)),
        "server_cpu_busy_cores": round(busy.cpu_s / (busy.end - busy.start), 2),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors.most_common()),
        "error_samples": measured["error_samples"][: ERROR_SAMPLES // 2] + load.error_samples[: ERROR_SAMPLES // 2],
        "falsely_suspect": _falsely_suspect(judged_from, busy.end, measured),
        "jobs_submitted": len(load.submitted),
        "jobs_placed": len({job for _, job, _ in allocations}),
        "assignments_unheard": unheard,
        "cancels": len(load.cancelled),
        "cancels_unheard": cancels_unheard,
        "cancelled_before_placed": cancelled_queued,
    }


def _per(amount: float, count: int) -> float | None:
    return round(amount / count, 3) if count else None


def _falsely_suspect(since: float, until: float, measured: dict) -> int:
    """Units judged suspect or offline in [since, until] although their agent's stream was up
    since before ``since`` and never dropped (a drop is an error of its own)."""
    from datetime import UTC, datetime

    from marketplace.kernel.models import AuditEvent

    judged = AuditEvent.objects.filter(
        action__in=["unit.went_suspect", "unit.went_offline"],
        created_at__gte=datetime.fromtimestamp(since, UTC),
        created_at__lte=datetime.fromtimestamp(until, UTC),
    ).values_list("subject_id", flat=True)
    held = {unit for unit, at in measured["established"].items() if at <= since} - set(measured["drops"])
    return len({str(unit) for unit in judged} & held)


# -- the processes ----------------------------------------------------------------------------------


class Swarm:
    """The swarm's processes: their specs, status lines and results."""

    def __init__(self, agents: list[dict], processes: int, options: dict, log_dir: Path) -> None:
        self.processes: list[subprocess.Popen] = []
        self.status: list[dict] = [{} for _ in range(processes)]
        self.samples: list[tuple[float, int]] = []  # (when, agents connected in all)
        self.results = [log_dir / f"swarm-{n}.results.json" for n in range(processes)]
        self.reported = [threading.Event() for _ in range(processes)]
        for n in range(processes):
            spec = {
                "ramp_per_s": options["ramp_per_s"] / processes,
                "ramp_pending": max(1, options["ramp_pending"] // processes),
                "seed": options["seed"] + n,
                "agents": agents[n::processes],
            }
            spec_path = log_dir / f"swarm-{n}.spec.json"
            spec_path.write_text(json.dumps(spec))
            with open(log_dir / f"swarm-{n}.log", "wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "marketplace.devtools.bench.swarm", str(spec_path), str(self.results[n])],
                    cwd=devstack.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                    start_new_session=True,
                )  # fmt: skip
            self.processes.append(process)
            threading.Thread(target=self._follow, args=(n,), daemon=True).start()
        threading.Thread(target=self._sample, daemon=True).start()

    def _follow(self, n: int) -> None:
        for line in self.processes[n].stdout:
            with contextlib.suppress(ValueError):
                status = json.loads(line)
                if "reported" in status:
                    self.reported[n].set()
                else:
                    self.status[n] = status

    def _sample(self) -> None:
        while all(process.poll() is None for process in self.processes):
            self.samples.append((time.time(), self.connected()))
            time.sleep(1.0)

    def connected(self) -> int:
        return sum(status.get("connected", 0) for status in self.status)

    def errors_by_kind(self) -> Counter:
        return sum((Counter(status.get("errors_by_kind") or {}) for status in self.status), Counter())

    def connected_between(self, start: float, end: float) -> int:
        return min((n for at, n in self.samples if start <= at <= end), default=0)

    def wait_connected(self, agents: int, *, timeout: float) -> bool:
        """Wait until every agent's stream is up and its first heartbeat answered; False if that
        took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.connected() < agents:
            dead = [n for n, process in enumerate(self.processes) if process.poll() is not None]
            if dead:
                raise CommandError(f"swarm process {dead[0]} exited; see its log.")
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def report(self) -> dict:
        for process in self.processes:
            process.stdin.write("report\n")
            process.stdin.flush()
        for n, reported in enumerate(self.reported):
            if not reported.wait(120):
                raise CommandError(f"swarm process {n} did not report; see its log.")
        merged: dict = {"hb_at": [], "hb_ms": [], "assigned": {}, "cancelled": {}, "errors": Counter(),
                        "error_samples": [], "drops": {}, "established": {}}  # fmt: skip
        for path in self.results:
            part = json.loads(path.read_text())
            merged["hb_at"] += part["hb_at"]
            merged["hb_ms"] += part["hb_ms"]
            for key in ("assigned", "cancelled", "drops", "established"):
                merged[key].update(part[key])
            merged["errors"].update(part["errors"])
            merged["error_samples"] += part["error_samples"]
        return merged

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    process.stdin.write("stop\n")
                    process.stdin.flush()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _connection_server_argv(port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "marketplace.asgi:application", "--host", "127.0.0.1", "--port", str(port),
        # As the image's worker class (marketplace.kernel.gunicorn.Worker) sets them.
        "--ws", "websockets-sansio", "--ws-ping-interval", "0", "--no-access-log",
        "--backlog", "4096", "--timeout-graceful-shutdown", "5",
    ]  # fmt: skip


def _environ(database: dict, redis_url: str, log_dir: Path) -> dict:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "marketplace.settings.production",
        "DATABASE_URL": database_url(database),
        "REDIS_URL": redis_url,
        "CACHE_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "SECRET_KEY": settings.SECRET_KEY,  # the node credentials' HMACs were made with it
        "DEBUG": "false",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "SECURE_SSL_REDIRECT": "false",
        "SECURE_COOKIES": "false",
        "SHEDSHARE_DATA_DIR": str(log_dir / "data"),
        # One benchmark renter submits what many renters would.
        "API_RATE_LIMIT": "1000000/min",
        "API_SUBMIT_RATE_LIMIT": "1000000/min",
        "PYTHONUNBUFFERED": "1",
    }


def _redis_start(stack: devstack.Stack) -> str:
    import redis

    port = _free_port()
    stack.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(stack.log_dir)])  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise CommandError(f"redis-server did not start; see {stack.log_dir}/redis.log.") from None
            time.sleep(0.1)


def _wait_log(stack: devstack.Stack, name: str, text: str, count: int) -> None:
    deadline = time.monotonic() + STARTUP_S
    while stack.log(name).count(text) < count:
        if stack.processes[name].poll() is not None or time.monotonic() > deadline:
            raise CommandError(f"{name} did not start ({text!r} x{count}); see {stack.log_dir}/{name}.log.")
        time.sleep(0.5)


def _stop(stack: devstack.Stack, swarm: Swarm | None) -> None:
    """The connection servers first (their streams close as a server going away, so no unit is
    marked lost), then the swarm, then the rest."""
    for name in [name for name in stack.processes if name.startswith("connections")]:
        stack.stop(name, timeout=20)
    if swarm is not None:
        swarm.stop()
    for name in ("beat", "web", "worker", "redis"):
        if name in stack.processes:
            stack.stop(name, timeout=20)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _open_files(need: int) -> None:
    """Raise this process's open-file limit (the children inherit it) to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise CommandError(
            f"{need} open files are needed per process and the hard limit is {hard}: raise it (ulimit -Hn, or "
            "LimitNOFILE) or use more --connection-servers and --swarm-processes."
        )
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _interrupt_once() -> dict:
    """Ctrl-C or SIGTERM ends the benchmark: the children are stopped and the database dropped,
    and a second one does not cut that short (it would leave processes behind). Returns the
    handlers replaced."""

    def interrupt(signum, frame):
        for name in (signal.SIGINT, signal.SIGTERM):
            signal.signal(name, signal.SIG_IGN)
        print("interrupted: stopping every process", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
