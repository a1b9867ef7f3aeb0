"""Faults, over the live web server: what a client is told while a part of the system is down."""

import subprocess
import time

import httpx
import pytest

from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from marketplace.jobs.models import Job
from nodes.services import unit_register
from tests.conftest import JOB_SPEC, user_make
from tests.e2e import Renter, free_port, stack_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_submit_while_the_broker_is_down_is_a_201_for_the_job_it_stored(tmp_path):
    """The broker's address answers nothing: the job is committed, so the client is told so (a
    500 would make it retry and pay twice); placement's sweep picks the queued job up later."""
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    stack = devstack.Stack(env={**stack_env(tmp_path / "data"), "CELERY_BROKER_URL": dead_broker}, log_dir=tmp_path)
    port = free_port()
    stack.start("web", devstack.web_argv(port))
    try:
        devstack.wait_http(f"http://127.0.0.1:{port}/api/schema/", timeout=60)
        _, key = api_key_create(user=user_make("rita-renter"), name="faults")
        began = time.monotonic()
        renter = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})
        response = renter.post("/api/v1/jobs", json=JOB_SPEC, timeout=30)
        took = time.monotonic() - began

        assert response.status_code == 201, response.text
        assert Job.objects.get(pk=response.json()["id"]).state == Job.State.QUEUED
        assert took < 15  # a few bounded connection attempts, not a hung request
        stack.stop("web")
        assert "task_publish_failed task=marketplace.jobs.tasks.job_place" in stack.log("web")
    finally:
        stack.stop_all()


def test_stopping_the_stack_stops_the_jobs_and_leaves_none_running(running_stack, tmp_path):
    """What Ctrl-C does to the demo: the agent, running with ``--drain stop``, stops its job and
    reports it before it exits; no job process outlives it and no job stays running."""
    stack = running_stack
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    wallet_credit_promotional(user=renter, amount_micros=100_000_000, key="faults-credit")
    unit, token = unit_register(owner=owner, name="Demo shed", country="DE")
    config = str(tmp_path / "agent" / "agent.json")
    assert stack.run(devstack.agent_argv("enrol", "--url", stack.base_url, "--token", token, "--config", config,
                                         "--country", "DE")).returncode == 0  # fmt: skip
    stack.start(
        "agent",
        devstack.agent_argv(
            "run", "--config", config, "--simulate", "1xH100-80GB", "--work-dir", str(tmp_path / "agent" / "work"),
            "--dev-runtime", "--drain", "stop",
        ),
    )  # fmt: skip
    _, key = api_key_create(user=renter, name="faults")
    shopper = Renter(stack.base_url, key)
    job = shopper.submit(image="busybox", command=["sleep", "313"])
    wait_until(lambda: shopper.job(job["id"])["state"] == "running", timeout=60, what="the job running")

    stack.stop_all()

    assert Job.objects.get(pk=job["id"]).state not in Job.ACTIVE_STATES
    assert subprocess.run(["pgrep", "-f", "sleep 313"], capture_output=True).returncode == 1  # none left
