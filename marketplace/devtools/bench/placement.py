"""Placement benchmark: a synthetic marketplace on a scratch PostgreSQL database.

Two modes:

* ``throughput`` — ``--jobs`` jobs are queued up front and ``--workers`` processes run the
  placement pass (the very function the Celery task runs) at once; they share the queue out
  with SKIP LOCKED and each claims its decisions in batches. Reports placements per second over
  the whole run, and p50/p99 of the time a placed job's batch held it (lock to commit).
* ``latency`` — a real Celery worker (``--workers`` processes) serves the configured broker
  while this process submits jobs through the renter service at ``--rate`` per second with
  capacity free; reports submit→placed latency from the jobs' own timestamps.

Both report ``double_bookings`` (counted from the data, not assumed from the constraint) and
``pgbench_tps``: PostgreSQL's own simple-update benchmark (``pgbench -N``) on the same server in
the same run, so the placement rate can be read against what the database itself can do.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections
from django.utils import timezone

COUNTRIES = [("DE", "DE-BY"), ("DE", "DE-BE"), ("FR", ""), ("NL", ""), ("SE", ""), ("CH", ""), ("GB", ""),
             ("US", "US-CA"), ("US", "US-TX")]  # fmt: skip
GPU_MODELS = [("H100", 81920, "12.4"), ("A100", 81920, "12.2"), ("L40S", 46068, "12.4")]
PRICES = [1_500_000, 2_000_000, 2_500_000, 3_000_000]
# Job shapes: (GPUs, weight) — mostly single GPUs, some gangs up to a whole unit.
GANGS = [(1, 55), (2, 20), (4, 15), (8, 10)]
HEARTBEAT_EVERY_S = 5.0
SUBMITTERS = 8  # latency mode: renters submitting at once
HEARTBEAT_TICK_S = 0.5


HELP = "Placement throughput (a backlog, N workers) or submit-to-placed latency at a fixed rate, on PostgreSQL."


def add_arguments(parser) -> None:
    parser.add_argument("--mode", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--gpus-per-unit", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=20_000, help="throughput mode: jobs queued up front")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0, help="latency mode: submits per second")
    parser.add_argument("--duration", type=float, default=20.0, help="latency mode: seconds of submitting")
    parser.add_argument("--kill-one-after", type=float, default=None, help="SIGKILL one worker after this long")
    parser.add_argument("--pgbench-seconds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep-database", action="store_true", help="leave the scratch database for inspection")


def run(**options) -> dict:
    if connection.vendor != "postgresql":
        raise CommandError("bench placement needs PostgreSQL: set DATABASE_URL to a PostgreSQL server.")
    if options["units"] < 1 or options["workers"] < 1:
        raise CommandError("--units and --workers must be at least 1.")
    with scratch_database(keep=options["keep_database"]) as database:
        started = time.perf_counter()
        rng = random.Random(options["seed"])
        renter = populate(rng, options["units"], options["gpus_per_unit"])
        setup_s = time.perf_counter() - started
        tps = pgbench_tps(database, seconds=options["pgbench_seconds"], clients=options["workers"])
        with heartbeats():
            if options["mode"] == "throughput":
                result = throughput(rng, renter, options)
            else:
                result = latency(rng, renter, options, database)
        result.update(
            double_bookings=double_bookings(),
            pgbench_tps=tps,
            placements_vs_pgbench=round(result["placements_per_s"] / tps, 3) if tps else None,
            units=options["units"],
            gpus=options["units"] * options["gpus_per_unit"],
            workers=options["workers"],
            setup_s=round(setup_s, 1),
            cpus=os.cpu_count(),
        )
        return {"mode": options["mode"], **result}


# The scratch database


@contextmanager
def scratch_database(*, keep: bool):
    """Create an empty database on the configured server, migrate it and point Django at it."""
    default = settings.DATABASES["default"]
    original = default["NAME"]
    name = f"shedshare_bench_{os.getpid()}"
    _admin_sql(f'CREATE DATABASE "{name}"')
    connections.close_all()
    default["NAME"] = name
    connections["default"].settings_dict["NAME"] = name
    try:
        call_command("migrate", verbosity=0, interactive=False)
        yield {**default, "NAME": name}
    finally:
        connections.close_all()
        default["NAME"] = original
        connections["default"].settings_dict["NAME"] = original
        if not keep:
            _admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin_sql(sql: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql)


def database_url(db: dict) -> str:
    auth = db.get("USER") or ""
    if db.get("PASSWORD"):
        auth += f":{db['PASSWORD']}"
    host = db.get("HOST") or "127.0.0.1"
    return f"postgres://{auth}@{host}:{db.get('PORT') or 5432}/{db['NAME']}"


def pgbench_tps(db: dict, *, seconds: int, clients: int) -> float | None:
    """PostgreSQL's built-in simple-update benchmark (pgbench -N), on the scratch database."""
    if seconds <= 0 or shutil.which("pgbench") is None:
        return None
    env = {**os.environ, "PGPASSWORD": db.get("PASSWORD") or ""}
    target = ["-h", db.get("HOST") or "127.0.0.1", "-p", str(db.get("PORT") or 5432), "-U", db.get("USER") or ""]
    subprocess.run(["pgbench", "-i", "-q", "-s", "10", *target, db["NAME"]], env=env, check=True,
                   capture_output=True)  # fmt: skip
    out = subprocess.run(
        ["pgbench", "-N", "-c", str(clients), "-j", str(min(clients, os.cpu_count() or 1)), "-T", str(seconds),
         *target, db["NAME"]],
        env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    found = re.search(r"tps = ([0-9.]+)", out)
    return round(float(found.group(1)), 1) if found else None


# The synthetic marketplace


def populate(rng: random.Random, units: int, gpus_per_unit: int):
    """Owners' units, all online, each with its GPUs sold whole; returns the renter."""
    from nodes.models import GPU, Slice, Unit

    User = get_user_model()
    owner = User.objects.create_user("bench-owner")
    renter = User.objects.create_user("bench-renter")
    now = timezone.now()
    unit_rows, gpu_rows, slice_rows = [], [], []
    for n in range(units):
        country, subdivision = rng.choice(COUNTRIES)
        price = rng.choice(PRICES)
        unit = Unit(
            id=uuid.UUID(int=rng.getrandbits(128)),
            owner=owner,
            name=f"shed-{n}",
            country=country,
            subdivision=subdivision,
            status=Unit.Status.ONLINE,
            price_per_gpu_hour_micros=price,
            location_verified=rng.random() < 0.7,
            last_heartbeat_at=now,
            enrolled_at=now,
        )
        unit_rows.append(unit)
        model, vram, cuda = rng.choice(GPU_MODELS)
        for index in range(gpus_per_unit):
            gpu = GPU(
                id=uuid.UUID(int=rng.getrandbits(128)),
                unit=unit,
                index=index,
                device_uuid=f"GPU-{n}-{index}",
                model=model,
                vram_mb=vram,
                cuda_version=cuda,
            )
            gpu_rows.append(gpu)
            slice_rows.append(
                Slice(unit=unit, gpu=gpu, device_uuid=gpu.device_uuid, vram_mb=vram, price_per_gpu_hour_micros=price)
            )
    Unit.objects.bulk_create(unit_rows, batch_size=2000)
    GPU.objects.bulk_create(gpu_rows, batch_size=5000)
    Slice.objects.bulk_create(slice_rows, batch_size=5000)
    from billing.services import wallet_credit_promotional

    wallet_credit_promotional(user=renter, amount_micros=10**15, key="bench-credit")  # pays for every job
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return renter


def job_spec(rng: random.Random) -> dict:
    """A renter's job: a gang size, and now and then a residency, price or model requirement."""
    gang = rng.choices([g for g, _ in GANGS], weights=[w for _, w in GANGS])[0]
    spec = {"image": "ghcr.io/acme/train:1", "command": ["python", "train.py"], "gpu_count": gang}
    roll = rng.random()
    if roll < 0.4:
        spec["jurisdictions"] = ["EU"]
    elif roll < 0.5:
        spec["jurisdictions"] = ["DE"]
        spec["require_verified_location"] = True
    if rng.random() < 0.2:
        spec["max_price_per_gpu_hour_micros"] = 2_500_000
    if rng.random() < 0.2:
        spec["gpu_models"] = ["H100"]
    return spec


@contextmanager
def heartbeats():
    """Keep every unit's heartbeat fresh while the benchmark runs, at the write rate of one
    heartbeat per unit every HEARTBEAT_EVERY_S (as 10,000 agents would send), in slices of the
    units so that no one statement holds many rows for long. Rows are locked in key order, as
    placement locks them."""
    stop = threading.Event()
    slices = max(1, int(HEARTBEAT_EVERY_S / HEARTBEAT_TICK_S))

    def beat():
        n = 0
        while True:
            with connection.cursor() as cursor:
                cursor.execute(
                    "UPDATE nodes_unit SET last_heartbeat_at = %s WHERE id IN (SELECT id FROM nodes_unit "
                    "WHERE abs(hashtext(id::text)) %% %s = %s FOR UPDATE SKIP LOCKED)",
                    [timezone.now(), slices, n % slices],
                )
            n += 1
            if stop.wait(HEARTBEAT_TICK_S):
                break
        connections.close_all()

    Unit = apps.get_model("nodes", "Unit")
    Unit.objects.update(last_heartbeat_at=timezone.now())
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def double_bookings() -> int:
    """Slices with more than one active lease, plus jobs with more than one active allocation."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM (SELECT slice_id FROM jobs_lease WHERE released_at IS NULL "
            "GROUP BY slice_id HAVING count(*) > 1) AS twice"
        )
        slices = cursor.fetchone()[0]
        cursor.execute(
            "SELECT count(*) FROM (SELECT job_id FROM jobs_allocation WHERE released_at IS NULL "
            "GROUP BY job_id HAVING count(*) > 1) AS twice"
        )
        return slices + cursor.fetchone()[0]


def _percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {"p50_ms": None, "p99_ms": None}
    values = sorted(values_ms)
    return {
        "p50_ms": round(statistics.median(values), 2),
        "p99_ms": round(values[min(len(values) - 1, int(len(values) * 0.99))], 2),
    }


# Throughput: workers place a backlog


def throughput(rng: random.Random, renter, options: dict) -> dict:
    from marketplace.jobs.models import Job
    from marketplace.jobs.placement import placement_pass

    now = timezone.now()
    jobs = [
        Job(renter=renter, created_at=now + timedelta(microseconds=n), **job_spec(rng)) for n in range(options["jobs"])
    ]
    Job.objects.bulk_create(jobs, batch_size=5000)
    workers = options["workers"]
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(workers + 1)
    results = context.Queue()
    connections.close_all()
    processes = [context.Process(target=_worker, args=(ready, results, n, workers)) for n in range(workers)]
    for process in processes:
        process.start()
    ready.wait()  # every worker has built its capacity view
    started = time.perf_counter()
    killed = None
    if options["kill_one_after"] is not None:
        time.sleep(options["kill_one_after"])
        killed = processes[0]
        os.kill(killed.pid, signal.SIGKILL)
    latencies, claims = [], Counter()
    for _ in range(workers - (killed is not None)):
        _, samples, stats = results.get()
        latencies.extend(samples)
        claims.update(stats)
    for process in processes:
        process.join()
    seconds = time.perf_counter() - started
    placed = _placed_count()
    recovered = 0
    if killed is not None:
        # The dead worker's jobs are still queued: the periodic deep pass takes them.
        while (n := placement_pass(limit=1000)) > 0:
            recovered += n
    return {
        "jobs": options["jobs"],
        "placed": placed,
        "placements_per_s": round(placed / seconds, 1),
        "seconds": round(seconds, 2),
        **_percentiles(latencies),
        "claims": dict(claims),
        "killed_worker": killed is not None,
        "placed_after_kill_by_sweep": recovered,
        "left_queued": Job.objects.filter(state=Job.State.QUEUED).count(),
        "left_queued_why": _pending_reasons(),
    }


def _worker(ready, results, shard: int, shards: int) -> None:
    from marketplace.jobs import placement

    connections.close_all()
    placement.engine_start(shard=shard, shards=shards).view.refresh()
    ready.wait()
    samples = []

    def observe(seconds: float, placed: int) -> None:
        samples.extend([seconds * 1000] * placed)

    placed = 0
    while (more := placement.placement_pass(limit=10**9, observe=observe)) > 0:
        placed += more  # a pass leaves jobs that kept losing races to the next one
    results.put((placed, samples, dict(placement.engine().stats)))
    connections.close_all()


def _placed_count() -> int:
    from marketplace.jobs.models import Allocation

    return Allocation.objects.count()


def _pending_reasons() -> dict:
    """What the jobs still queued were told, summed: the reason each unit gave them."""
    from marketplace.jobs.models import Job

    totals: dict[str, int] = {}
    for reason in Job.objects.filter(state=Job.State.QUEUED).values_list("pending_reason", flat=True)[:1000]:
        for why, count in (reason or {}).get("rejected", {}).items():
            totals[why] = totals.get(why, 0) + count
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:8])


# Latency: a real Celery worker, submits at a fixed rate


def latency(rng: random.Random, renter, options: dict, database: dict) -> dict:
    from marketplace.jobs.models import Job
    from marketplace.jobs.services import job_submit

    env = {**os.environ, "DATABASE_URL": database_url(database), "PLACEMENT_SHARDS": str(options["workers"])}
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-worker-", suffix=".log", delete=False)  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "marketplace", "worker", "-c", str(options["workers"]), "-O", "fair",
         "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
         "-n", f"bench-{os.getpid()}@%h"],
        env=env, cwd=settings.BASE_DIR, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        # Every worker process builds its capacity view before it takes tasks; measuring starts
        # once all have, and a burst has gone through.
        _wait_views_built(log.name, options["workers"], timeout=300)
        warm = [job_submit(renter=renter, spec=job_spec(rng)) for _ in range(options["workers"] * 3)]
        _wait_placed([job.pk for job in warm], timeout=120)
        time.sleep(1.0)
        count = int(options["rate"] * options["duration"])
        specs = [job_spec(rng) for _ in range(count)]
        started = time.perf_counter()

        def submit(n: int):
            # Each submit at its own moment on the clock, as independent renters would send them.
            delay = started + n / options["rate"] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            return job_submit(renter=renter, spec=specs[n]).pk

        with ThreadPoolExecutor(max_workers=SUBMITTERS) as pool:
            submitted = list(pool.map(submit, range(count)))
        achieved = count / (time.perf_counter() - started)
        _wait_placed(submitted, timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    rows = Job.objects.filter(pk__in=submitted, placed_at__isnull=False).values_list("created_at", "placed_at")
    waits = [(placed - created).total_seconds() * 1000 for created, placed in rows]
    placed_span = (max(p for _, p in rows) - min(c for c, _ in rows)).total_seconds() if rows else 0.0
    return {
        "rate": options["rate"],
        "achieved_rate": round(achieved, 1),
        "submitted": len(submitted),
        "placed": len(waits),
        "placements_per_s": round(len(waits) / max(placed_span, 1e-9), 1),
        **_percentiles(waits),
        "broker": settings.CELERY_BROKER_URL.split("://")[0],
        "worker_log": log.name,
        "left_queued_why": _pending_reasons(),
    }


def _wait_views_built(log_path: str, processes: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as log:
            if log.read().count("Capacity view built") >= processes:
                return
        time.sleep(0.2)
    raise CommandError(f"The worker's processes did not build their capacity views in {timeout:.0f} s: see {log_path}.")


def _wait_placed(job_ids: list, *, timeout: float) -> None:
    from marketplace.jobs.models import Job

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Job.objects.filter(pk__in=job_ids, state=Job.State.QUEUED, pending_reason={}).exists():
            return
        time.sleep(0.2)
