"""The end-to-end harness: real web, worker and agent processes against the test database."""

import socket
import time
from pathlib import Path
from urllib.parse import quote

import httpx
from django.conf import settings
from django.db import connection

from marketplace.devtools import devstack
from tests.conftest import child_environ


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_url() -> str:
    """The URL of the database pytest-django created, for the child processes."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    auth = quote(db["USER"] or "")
    if db["PASSWORD"]:
        auth += ":" + quote(db["PASSWORD"])
    return f"postgres://{auth}@{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


def stack_env(data_dir) -> dict:
    env = child_environ()
    env.update(
        DATABASE_URL=test_database_url(),
        SECRET_KEY=settings.SECRET_KEY,
        SECRETS_KEYS=",".join(settings.SECRETS_KEYS),
        DEBUG="false",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        SHEDSHARE_DATA_DIR=str(data_dir),
        DJANGO_SETTINGS_MODULE="marketplace.settings.production",
        UNIT_SUSPECT_AFTER_S="15",
        HEARTBEAT_INTERVAL_S="1",
        # The stack serves plain HTTP on 127.0.0.1 (the production settings' other hardening holds).
        SECURE_SSL_REDIRECT="false",
        # The tests' clients (the live fuzzer above all) ask far faster than a renter may, and
        # send enrolments that fail on purpose; the agents keep the default per-unit limits.
        API_RATE_LIMIT="100000/min",
        API_SUBMIT_RATE_LIMIT="100000/min",
        ENROL_FAILURE_LIMIT="100000/min",
        PROMETHEUS_MULTIPROC_DIR=devstack.metrics_dir(Path(data_dir) / "metrics"),
    )
    return env


def wait_until(predicate, *, timeout: float, interval: float = 0.25, what="condition"):
    """Poll until predicate() is truthy and return it; ``what`` (text, or a function giving the
    text at the moment of failure) names what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


class Renter:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10)

    def submit(self, **spec) -> dict:
        response = self.http.post("/api/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: str) -> dict:
        response = self.http.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_final(self, job_id: str, *, timeout: float = 60) -> dict:
        final = {"succeeded", "failed", "cancelled", "lost"}
        return wait_until(
            lambda: (job := self.job(job_id))["state"] in final and job, timeout=timeout, what=f"job {job_id} to end"
        )


def stack_start(tmp_path, *, port: int, **env: str) -> devstack.Stack:
    """Web server and worker on the test database; ``env`` overrides settings for both."""
    stack = devstack.Stack(env={**stack_env(tmp_path / "data"), **env}, log_dir=tmp_path / "logs")
    stack.start("web", devstack.web_argv(port))
    stack.start("worker", devstack.worker_argv(concurrency=2))
    stack.base_url = f"http://127.0.0.1:{port}"
    devstack.wait_http(f"{stack.base_url}/api/schema/", timeout=30)
    return stack
