"""The demo under a steady load: ``manage.py demo`` run as a user runs it, jobs submitted over its
API at a fixed rate by a few renters, then Ctrl-C, then the invariants checked on its database.

The verdict is one JSON object: what was submitted and what the API answered, how the jobs
ended, whether the demo stayed up and stopped cleanly (no job left running, no job process left
behind) and every data invariant (``marketplace.devtools.invariants``).
"""

import logging
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack, invariants
from marketplace.jobs.models import Job

HELP = "Run the demo under a steady submit load, stop it, and check the invariants on its database."
RENTERS = 4  # the load is spread as many renters spread it; each stays under its own submit limit
RENTER_CREDIT_MICROS = 1_000_000_000
SETTLE_S = 180.0  # after the load: for the last jobs to end and their usage to be posted
STOP_S = 90.0  # Ctrl-C to exit: the agents drain (stop and report) their jobs


def add_arguments(parser) -> None:
    parser.add_argument("--minutes", type=float, default=60.0, help="How long to submit (default 60).")
    parser.add_argument("--rate", type=float, default=1.0, help="Submits per second (default 1).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=1)


def job_spec(rng: random.Random, marker: str) -> dict:
    """A short job of the mix a demo sees: one or two GPUs, in Germany, France or anywhere.
    ``marker`` tags its process so none can outlive the demo unseen."""
    seconds = rng.randint(1, 8)
    return {
        "name": "soak",
        "image": "docker.io/library/python:3.12-slim",
        "command": ["sh", "-c", f"sleep {seconds}; echo {marker}"],
        "gpu_count": rng.choice((1, 1, 1, 2)),
        "jurisdictions": rng.choice((["DE"], ["FR"], ["EU"], [])),
        "max_price_per_gpu_hour": "10.00",
        "max_duration_s": 120,
        "restartable": rng.random() < 0.5,
    }


def _renters(run: str) -> list[str]:
    keys = []
    for number in range(1, RENTERS + 1):
        user, _ = get_user_model().objects.get_or_create(username=f"soak-renter-{number}")
        wallet_credit_promotional(user=user, amount_micros=RENTER_CREDIT_MICROS, key=f"soak:{run}:{user.pk}")
        keys.append(api_key_create(user=user, name=f"soak {run}")[1])
    return keys


def _demo_start(port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, str(devstack.REPO / "manage.py"), "demo", "--port", str(port)],
            cwd=devstack.REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while "Press Ctrl-C" not in log.read_text(errors="replace"):
        if demo.poll() is not None or time.monotonic() > deadline:
            demo.kill()
            raise RuntimeError(f"the demo did not start; see {log}")
        time.sleep(0.5)
    return demo


def _load(demo, clients, rng, *, seconds: float, rate: float, marker: str):
    """Submit at ``rate`` for ``seconds`` (fixed schedule, no catching up in bursts); returns the
    acknowledged job ids, the answers by status, submit latencies and whether the demo died."""
    acknowledged, answers, latencies = [], Counter(), []
    due = time.monotonic()
    for n in range(int(seconds * rate)):
        if demo.poll() is not None:
            return acknowledged, answers, latencies, True
        due = max(due + 1 / rate, time.monotonic())  # a slow answer is not made up for in a burst
        time.sleep(max(0.0, due - time.monotonic()))
        client = clients[n % len(clients)]
        sent = time.monotonic()
        try:
            response = client.post("/api/v1/jobs", json=job_spec(rng, marker))
        except httpx.TransportError as exc:
            answers[type(exc).__name__] += 1
            continue
        latencies.append(time.monotonic() - sent)
        answers[str(response.status_code)] += 1
        if response.status_code == 201:
            acknowledged.append(response.json()["id"])
            if rng.random() < 0.05:  # now and then a renter changes their mind
                client.post(f"/api/v1/jobs/{acknowledged[-1]}/cancel")
    return acknowledged, answers, latencies, demo.poll() is not None


def _settle(job_ids, *, timeout: float) -> float:
    """Wait for the jobs to end and every ended allocation to be charged; returns seconds taken."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        with connection.cursor() as cursor:
            if not invariants.stranded_job(cursor, job_ids) and not invariants.billing(cursor):
                break
        time.sleep(2)
    return round(time.monotonic() - began, 1)


def _percentile(values: list[float], q: float) -> float | None:
    return round(sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else None


def run(*, minutes: float, rate: float, port: int, seed: int, **_) -> dict:
    if not settings.DEBUG:
        raise ValueError("The soak runs the demo, which needs DEBUG=true.")
    if not 0 < rate <= 20 or not 0 < minutes <= 24 * 60:
        raise ValueError("--rate must be in (0, 20] per second and --minutes in (0, 1440].")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    call_command("migrate", verbosity=0)
    run_id = uuid.uuid4().hex[:12]
    marker = f"soak-{run_id}"
    log_dir = settings.DATA_DIR / "soak-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    keys = _renters(run_id)
    log_sizes = {path: path.stat().st_size for path in (settings.DATA_DIR / "demo-logs").glob("*.log")}
    demo = _demo_start(port, log_dir / f"demo-{run_id}.log")
    base_url = f"http://127.0.0.1:{port}"
    clients = [httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {k}"}, timeout=30) for k in keys]
    began = time.monotonic()
    acknowledged, answers, latencies, crashed = _load(
        demo, clients, random.Random(seed), seconds=minutes * 60, rate=rate, marker=marker
    )
    settle_s = None if crashed else _settle(acknowledged, timeout=SETTLE_S)
    running_at_stop = Job.objects.filter(pk__in=acknowledged, state__in=Job.ACTIVE_STATES).count()
    if demo.poll() is None:
        demo.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        exit_code = demo.wait(STOP_S)
    except subprocess.TimeoutExpired:
        demo.kill()
        exit_code = "did not stop"
    left_behind = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    with connection.cursor() as cursor:
        found = invariants.check(cursor, now=timezone.now(), job_ids=acknowledged)
    states = Counter(Job.objects.filter(pk__in=acknowledged).values_list("state", flat=True))
    ok = (
        not crashed and exit_code == 0 and not left_behind and not any(found.values())
        and set(answers) == {"201"}
        and states.get(Job.State.RUNNING, 0) == 0
    )  # fmt: skip
    return {
        "ok": ok,
        "minutes": minutes,
        "rate_per_s": rate,
        "ran_s": round(time.monotonic() - began, 1),
        "submitted": sum(answers.values()),
        "answers": dict(answers),
        "acknowledged": len(acknowledged),
        "submit_ms": {"p50": _percentile(latencies, 0.5), "p99": _percentile(latencies, 0.99)},
        "final_states": dict(states),
        "demo_crashed": crashed,
        "settled_s": settle_s,
        "active_at_stop": running_at_stop,
        "demo_exit_code": exit_code,
        "job_processes_left": len(left_behind),
        "invariants": {name: len(violations) for name, violations in found.items()},
        "violations": {name: violations[:5] for name, violations in found.items() if violations},
        "logs": str(log_dir),
        "errors_in_logs": _errors(settings.DATA_DIR / "demo-logs", log_sizes),
    }


def _errors(demo_logs: Path, sizes: dict) -> list[str]:
    """Lines of the demo's process logs, written during this run, that tell of an error."""
    lines = []
    for path in sorted(demo_logs.glob("*.log")):
        with open(path, "rb") as log:
            log.seek(sizes.get(path, 0))
            text = log.read().decode(errors="replace")
        found = [line for line in text.splitlines() if re.search(r"Unrecoverable|Traceback", line)]
        lines += [f"{path.name}: {line[:200]}" for line in found]
    return lines[:10]
