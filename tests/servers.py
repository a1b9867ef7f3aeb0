"""Private PostgreSQL and Redis servers for tests that stop, kill and start them: each on a spare
port and in a folder of its own, never the shared ones."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.e2e import free_port, wait_until

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def tool(name: str) -> str:
    path = shutil.which(name) or (str(PG_BIN / name) if (PG_BIN / name).exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"this test needs {name} (PostgreSQL's server binaries and redis-server)")
        pytest.skip(f"{name} is not installed")
    return path


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL's server refuses to run as root; run it as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class Postgres:
    """A private PostgreSQL cluster on a spare port, stopped and started at will."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="test-pg-"))
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/test"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        initdb = _as_postgres([tool("initdb"), "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust"])
        subprocess.run([*initdb, "--no-sync"], check=True, capture_output=True)
        self.start()
        subprocess.run([tool("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "test"],
                       check=True)  # fmt: skip

    def _ctl(self, *args: str) -> None:
        ctl = _as_postgres([tool("pg_ctl"), "-D", str(self.dir / "data"), "-w", "-t", "60", *args])
        subprocess.run(ctl, check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._ctl("-o", options, "-l", str(self.dir / "server.log"), "start")

    def stop(self) -> None:
        self._ctl("-m", "immediate", "stop")  # as a crash or a cut cable would

    def cursor(self):
        import psycopg

        return psycopg.connect(self.url.replace("postgres://", "postgresql://"), autocommit=True).cursor()

    def close(self) -> None:
        subprocess.run(_as_postgres([tool("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop"]),
                       capture_output=True)  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    """A private Redis without persistence: a restart loses whatever the broker held."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self.start()

    def start(self) -> None:
        argv = [
            tool("redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: subprocess.run([tool("redis-cli"), "-p", str(self.port), "ping"],
                                          capture_output=True).returncode == 0, timeout=30, what="redis")  # fmt: skip

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
