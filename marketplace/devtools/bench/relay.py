"""The relay's cost: a job's HTTP port reached through the marketplace against the same port
reached directly over loopback, in the same run.

What runs, each its own process on this machine: the connection server (``uvicorn
marketplace.asgi:application``, as ``bench agents`` runs it) on a scratch PostgreSQL database,
the job (``relay_sides job``: an HTTP/1.1 server with keep-alive), and the agent's real stream
(``relay_sides agent``: ``nodes/agent/stream.py`` and its relay, reaching the job on loopback);
this process is the renters' client (httpx). The database holds one renter, one unit with its
node credential, and one running job declaring the port, as placement and the start leave them.

1. throughput: ``--streams`` downloads at once of ``--size-mb`` in all (each its share), first
   directly from the job, then through ``/services/<job>/<port>/`` with the renter's key:
   ``direct_mb_s`` and ``relay_mb_s`` (MiB/s over the wall time of all of them), and their ratio.
2. latency: ``--requests`` 1 KiB requests one after another (after a few to warm up), directly
   and through the relay: ``*_p50_ms`` and ``*_p99_ms``, and ``added_p99_ms``. Each relayed
   request is a channel of its own, opened over the agent's stream and closed after it.

``cpus`` says what the figures were measured on; every process shares its cores.
"""

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from django.core.management.base import CommandError
from django.db import connection

from marketplace.devtools import devstack
from marketplace.devtools.bench.agents import _connection_server_argv, _environ, _free_port, _redis_start
from marketplace.devtools.bench.placement import _percentiles, scratch_database

HELP = "A job's HTTP port through the relay over the agent's stream against directly: MB/s and 1 KiB latency."
WARM_UP = 20


def add_arguments(parser) -> None:
    parser.add_argument("--streams", type=int, default=64, help="downloads at once")
    parser.add_argument("--size-mb", type=int, default=256, help="MiB downloaded in all, each way of reaching it")
    parser.add_argument("--requests", type=int, default=500, help="1 KiB requests for the latency, each way")
    parser.add_argument("--keep-database", action="store_true", help="leave the scratch database for inspection")


def run(**options) -> dict:
    if connection.vendor != "postgresql":
        raise CommandError("bench relay needs PostgreSQL: set DATABASE_URL to a PostgreSQL server.")
    if min(options["streams"], options["size_mb"], options["requests"]) < 1:
        raise CommandError("--streams, --size-mb and --requests must be > 0.")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    with scratch_database(keep=options["keep_database"]) as database:
        return _bench(options, database, log_dir)


def _bench(options: dict, database: dict, log_dir: Path) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    job_port, server_port = _free_port(), _free_port()
    key, credential, job_id = _marketplace(job_port)
    stack = devstack.Stack(env=dict(os.environ), log_dir=log_dir)
    agent = None
    agent_log = (log_dir / "agent.log").open("wb")  # noqa: SIM115 - closed at the end
    try:
        # No heartbeats in this benchmark: its stream must not be taken for a silent one.
        stack.env = {**_environ(database, _redis_start(stack), log_dir), "STREAM_SILENT_S": "36000"}
        stack.start("connections", _connection_server_argv(server_port))
        stack.start("job", [sys.executable, "-m", "marketplace.devtools.bench.relay_sides", "job", str(job_port)])
        devstack.wait_http(f"http://127.0.0.1:{server_port}/", timeout=60)
        _wait_ready(stack, "job")
        agent = subprocess.Popen(
            [sys.executable, "-m", "marketplace.devtools.bench.relay_sides", "agent", f"http://127.0.0.1:{server_port}",
             credential, str(job_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=agent_log, env=stack.env,
        )  # fmt: skip
        if agent.stdout.readline().strip() != b"ready":
            raise CommandError(f"The agent did not connect; see {log_dir / 'agent.log'}.")
        direct = f"http://127.0.0.1:{job_port}"
        relayed = f"http://127.0.0.1:{server_port}/services/{job_id}/{job_port}"
        headers = {"Authorization": f"Bearer {key}"}
        _wait_served(relayed, headers)
        results = asyncio.run(_measure(direct, relayed, headers, options))
        results.update(cpus=os.cpu_count(), streams=options["streams"], size_mb=options["size_mb"],
                       requests=options["requests"], logs=str(log_dir))  # fmt: skip
        return results
    finally:
        if agent is not None:
            agent.stdin.close()
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
        agent_log.close()
        stack.stop_all()


def _marketplace(job_port: int) -> tuple[str, str, str]:
    """A renter's key, a unit's node credential, and the running job serving ``job_port``."""
    from django.contrib.auth import get_user_model

    from marketplace.accounts.services import api_key_create
    from marketplace.jobs.models import Allocation, Job
    from marketplace.kernel import tokens
    from nodes.models import Unit
    from nodes.services import NODE_CREDENTIAL_KIND, unit_register

    users = get_user_model().objects
    owner, renter = users.create_user("bench-owner"), users.create_user("bench-renter")
    unit, _ = unit_register(owner=owner, name="bench shed", country="DE")
    issued = tokens.token_issue(NODE_CREDENTIAL_KIND)
    Unit.objects.filter(pk=unit.pk).update(
        credential_lookup=issued.lookup, credential_digest=issued.digest, status=Unit.Status.ONLINE
    )
    job = Job.objects.create(renter=renter, image="bench/serve:1", command=["serve"], state=Job.State.RUNNING,
                             workload_class="service", ports=[{"port": job_port, "protocol": "http"}])  # fmt: skip
    Allocation.objects.create(job=job, unit=unit, price_per_gpu_hour_micros=0, gpu_count=1)
    _, key = api_key_create(user=renter, name="bench")
    return key, issued.plaintext, str(job.pk)


def _wait_ready(stack: devstack.Stack, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while "ready" not in stack.log(name):
        if time.monotonic() > deadline:
            raise CommandError(f"{name} did not start: {stack.log(name)[-2000:]}")
        time.sleep(0.1)


def _wait_served(url: str, headers: dict, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/bytes/1", headers=headers, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise CommandError("The relay did not reach the job.")
        time.sleep(0.2)


async def _measure(direct: str, relayed: str, headers: dict, options: dict) -> dict:
    size = options["size_mb"] * 2**20
    streams = options["streams"]
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        direct_mb_s = await _throughput(client, direct, {}, size, streams)
        relay_mb_s = await _throughput(client, relayed, headers, size, streams)
        direct_ms = await _latencies(client, direct, {}, options["requests"])
        relay_ms = await _latencies(client, relayed, headers, options["requests"])
    direct_p, relay_p = _percentiles(direct_ms), _percentiles(relay_ms)
    return {
        "relay_mb_s": round(relay_mb_s, 1),
        "direct_mb_s": round(direct_mb_s, 1),
        "relay_share_of_direct": round(relay_mb_s / direct_mb_s, 3),
        "relay_p50_ms": relay_p["p50_ms"],
        "relay_p99_ms": relay_p["p99_ms"],
        "direct_p50_ms": direct_p["p50_ms"],
        "direct_p99_ms": direct_p["p99_ms"],
        "added_p99_ms": round(relay_p["p99_ms"] - direct_p["p99_ms"], 2),
    }


async def _throughput(client: httpx.AsyncClient, base: str, headers: dict, size: int, streams: int) -> float:
    each = size // streams

    async def fetch() -> int:
        got = 0
        async with client.stream("GET", f"{base}/bytes/{each}", headers=headers) as response:
            if response.status_code != 200:
                raise CommandError(f"{base}: HTTP {response.status_code}")
            async for chunk in response.aiter_raw():
                got += len(chunk)
        return got

    started = time.perf_counter()
    got = sum(await asyncio.gather(*(fetch() for _ in range(streams))))
    elapsed = time.perf_counter() - started
    if got != each * streams:
        raise CommandError(f"{base}: {got} bytes of {each * streams}")
    return got / 2**20 / elapsed


async def _latencies(client: httpx.AsyncClient, base: str, headers: dict, count: int) -> list[float]:
    times = []
    for n in range(WARM_UP + count):
        started = time.perf_counter()
        response = await client.get(f"{base}/bytes/1024", headers=headers)
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200 or len(response.content) != 1024:
            raise CommandError(f"{base}: HTTP {response.status_code}, {len(response.content)} bytes")
        if n >= WARM_UP:
            times.append(elapsed)
    return times
