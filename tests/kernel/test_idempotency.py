"""Idempotency-Key on POST /api/v1/jobs: a retry replays the first answer and creates nothing."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.jobs import services, tasks
from marketplace.jobs.models import Job
from marketplace.kernel.api.idempotency import idempotency_records_prune
from marketplace.kernel.models import IdempotencyRecord
from tests.conftest import JOB_SPEC, problem_of, renter_client

JOBS = "/api/v1/jobs"


def submit(client, spec=JOB_SPEC, key="retry-1"):
    return client.post(JOBS, spec, format="json", HTTP_IDEMPOTENCY_KEY=key)


@pytest.mark.django_db
class TestReplay:
    def test_the_same_key_and_body_replay_the_first_answer_without_a_second_job(self, renter_api):
        first = submit(renter_api)
        second = submit(renter_api, spec=dict(reversed(JOB_SPEC.items())))

        assert first.status_code == 201, first.content
        assert (second.status_code, second.json()) == (201, first.json())
        assert second["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first
        assert Job.objects.count() == 1

    def test_the_same_key_with_another_body_is_a_422(self, renter_api):
        submit(renter_api)

        body = problem_of(submit(renter_api, spec={**JOB_SPEC, "name": "other"}), 422)

        assert body["type"] == "/problems/idempotency-key-reused"
        assert Job.objects.count() == 1

    def test_another_users_same_key_is_independent(self, renter_api, stranger_api, renter, stranger):
        mine, theirs = submit(renter_api), submit(stranger_api)

        assert (mine.status_code, theirs.status_code) == (201, 201)
        assert mine.json()["id"] != theirs.json()["id"]
        assert "Idempotent-Replayed" not in theirs
        assert Job.objects.filter(renter=renter).count() == Job.objects.filter(renter=stranger).count() == 1

    def test_different_keys_create_different_jobs(self, renter_api):
        submit(renter_api, key="a")
        submit(renter_api, key="b")

        assert Job.objects.count() == 2

    def test_a_failed_request_stores_nothing_so_a_fixed_retry_goes_through(self, renter_api):
        problem_of(submit(renter_api, spec={"image": ""}), 400)

        assert submit(renter_api, spec={"image": ""}).status_code == 400
        assert not IdempotencyRecord.objects.exists()

    def test_an_overlong_key_is_a_400(self, renter_api):
        problem_of(submit(renter_api, key="k" * 256), 400)

        assert submit(renter_api, key="k" * 255).status_code == 201

    def test_records_older_than_a_day_are_pruned(self, renter_api):
        submit(renter_api, key="old")
        submit(renter_api, key="new")
        IdempotencyRecord.objects.filter(key="old").update(created_at=timezone.now() - timedelta(hours=25))

        assert idempotency_records_prune() == 1
        assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["new"]

    def test_the_hourly_task_prunes_them(self, renter_api):
        submit(renter_api, key="old")
        IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(hours=25))

        assert tasks.idempotency_records_prune() == 1
        assert not IdempotencyRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_requests_with_one_key_create_one_job(renter, monkeypatch):
    """The first request is held inside job_submit while the second arrives; the unique
    constraint makes the second wait for the first and then replay its answer."""
    clients = [renter_client(renter), renter_client(renter)]
    for client in clients:
        client.get(JOBS)  # so that authenticating later writes nothing (last_used_at is fresh)
    inside, release = threading.Event(), threading.Event()
    real_submit = services.job_submit

    def slow_submit(**kwargs):
        inside.set()
        release.wait(5)
        return real_submit(**kwargs)

    monkeypatch.setattr(services, "job_submit", slow_submit)
    responses = []

    def request(client):
        try:
            responses.append(submit(client))
        finally:
            connection.close()

    first = threading.Thread(target=request, args=(clients[0],))
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=request, args=(clients[1],))
    second.start()
    time.sleep(0.3)
    release.set()
    first.join(10)
    second.join(10)

    assert sorted(r.status_code for r in responses) == [201, 201]
    assert len({r.json()["id"] for r in responses}) == 1
    # One made the job, one replayed it (in whichever order the threads got back).
    assert sorted(r.has_header("Idempotent-Replayed") for r in responses) == [False, True]
    assert Job.objects.count() == 1
