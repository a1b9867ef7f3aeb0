"""A task published after a commit cannot fail what committed (marketplace/kernel/tasks.py)."""

import logging
from unittest import mock

import pytest
from kombu.exceptions import OperationalError

from marketplace.jobs import tasks
from marketplace.jobs.models import Job
from marketplace.kernel.tasks import publish_on_commit
from tests.conftest import JOB_SPEC, unit_online

BROKER_DOWN = OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


class Task:
    name = "tests.task"

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.sent = error, []

    def delay(self, *args) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append(args)


@pytest.mark.django_db
def test_the_task_is_sent_once_the_transaction_commits(django_capture_on_commit_callbacks):
    task = Task()
    with django_capture_on_commit_callbacks(execute=True):
        publish_on_commit(task, "job-1")
        assert task.sent == []

    assert task.sent == [("job-1",)]


@pytest.mark.django_db
def test_a_broker_that_refuses_the_task_is_logged_not_raised(django_capture_on_commit_callbacks, caplog):
    with (
        caplog.at_level(logging.WARNING, logger="marketplace.kernel.tasks"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        publish_on_commit(Task(BROKER_DOWN), "job-1")

    assert "task_publish_failed task=tests.task" in caplog.text


@pytest.mark.django_db
def test_a_submit_during_a_broker_outage_is_a_201_and_the_sweep_places_the_job(
    renter_api, owner, django_capture_on_commit_callbacks
):
    unit, _ = unit_online(owner, gpus=1)
    with (
        mock.patch.object(tasks.job_place, "delay", side_effect=BROKER_DOWN),
        django_capture_on_commit_callbacks(execute=True),
    ):
        response = renter_api.post("/api/v1/jobs", JOB_SPEC, format="json")

    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    assert job.state == Job.State.QUEUED

    tasks.placement_sweep()  # what beat runs every 10 s: the job's committed state is the marker

    assert Job.objects.get(pk=job.pk).state == Job.State.PLACED
    assert job.allocations.get().unit_id == unit.pk
