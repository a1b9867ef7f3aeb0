"""Start and stop the marketplace's processes on one machine: web, Celery worker and beat, agents.

Used by ``manage.py demo`` and by the end-to-end tests, so both run the very same commands.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]


# How long the web server keeps an idle connection open: longer than its clients' and load
# balancers' own idle timeouts (httpx 5 s, common balancers 60 s), so that it is never the server
# that closes a connection a client is about to reuse (gunicorn's 2 s default made a renter's
# next request on such a connection fail with a read error).
KEEP_ALIVE_S = 75


def web_argv(port: int, *, workers: int = 1) -> list[str]:
    """The web server as the image runs it: gunicorn with uvicorn workers (ASGI), so a long poll
    waits in the event loop instead of holding a thread."""
    return [
        PYTHON, "-m", "gunicorn", "marketplace.asgi:application", "--bind", f"127.0.0.1:{port}",
        "--worker-class", "marketplace.kernel.gunicorn.Worker", "--workers", str(workers),
        "--graceful-timeout", "5", "--keep-alive", str(KEEP_ALIVE_S), "--access-logfile", "-", "--no-control-socket",
    ]  # fmt: skip


def worker_argv(*, concurrency: int = 2, name: str = "worker") -> list[str]:
    return [
        PYTHON, "-m", "celery", "-A", "marketplace.celery", "worker", "--loglevel", "INFO",
        "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
        "--without-mingle", "--without-gossip", "--without-heartbeat",
    ]  # fmt: skip


def beat_argv(schedule: Path) -> list[str]:
    return [
        PYTHON, "-m", "celery", "-A", "marketplace.celery", "beat", "--loglevel", "INFO", "--schedule", str(schedule),
    ]  # fmt: skip


def agent_argv(*args: str) -> list[str]:
    return [PYTHON, "-m", "nodes.agent", *args]


def wait_http(url: str, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.2)


AGENT_STOP_S = 30.0


def metrics_dir(path: Path) -> str:
    """An empty PROMETHEUS_MULTIPROC_DIR for a stack's web and worker processes, so that the web
    server's /metrics sums them all (marketplace/ops/metrics.py). Emptied at each start: values
    left by processes of an earlier run would be summed in too."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return str(path)


@dataclass
class Stack:
    """A set of named child processes sharing one environment and one log folder."""

    env: dict
    log_dir: Path
    base_url: str = ""
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], **env) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
            argv, cwd=REPO, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes[name] = process
        return process

    def run(self, argv: list[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def signal(self, name: str, signum: int) -> None:
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, signum)

    def stop(self, name: str, *, timeout: float = 10.0) -> int | None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def stop_all(self) -> None:
        # Agents first, so they can report to a server that is still up; they get the time to
        # stop their jobs (the job's notice, then a kill) and report them.
        for name in sorted(self.processes, key=lambda n: not n.startswith("agent")):
            self.stop(name, timeout=AGENT_STOP_S if name.startswith("agent") else 10.0)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
