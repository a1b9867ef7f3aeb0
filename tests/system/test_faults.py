"""Faults, over the live web server: what a client is told while a part of the system is down."""

import time

import httpx
import pytest

from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from marketplace.jobs.models import Job
from tests.conftest import JOB_SPEC, user_make
from tests.e2e import free_port, stack_env

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
