"""A renter's reads of one job: list filters, the events timeline, the logs and the usage."""

from datetime import UTC, datetime, timedelta

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from billing.services import usage_post, wallet_credit_promotional
from marketplace.jobs import job_reads
from marketplace.jobs.models import Job
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import job_cancel, log_chunk_record
from marketplace.jobs.usage import SampleReport, usage_record
from marketplace.kernel.api import longpoll
from marketplace.kernel.models import AuditEvent
from tests.conftest import allocation_since, job_make, problem_of, unit_online

JOBS = "/api/v1/jobs"


class Looks(list):
    then: dict


def url(job, part: str) -> str:
    return f"{JOBS}/{job.pk}/{part}"


@pytest.fixture
def shed(owner):
    return unit_online(owner, name="shed", gpus=2)[0]


@pytest.fixture
def placed(shed, renter):
    """A job placed on the shed, with its allocation."""
    allocation = job_place(job_id=job_make(renter, name="train-resnet").pk)
    assert allocation is not None
    return allocation


class TestListFilters:
    @pytest.fixture
    def jobs(self, renter):
        old = job_make(renter, name="Old-Sweep")
        Job.objects.filter(pk=old.pk).update(created_at=datetime(2026, 1, 1, tzinfo=UTC), state=Job.State.FAILED)
        done = job_make(renter, name="fine-tune")
        Job.objects.filter(pk=done.pk).update(created_at=datetime(2026, 3, 1, tzinfo=UTC), state=Job.State.SUCCEEDED)
        queued = job_make(renter, name="sweep-2")
        return {"old": old, "done": done, "queued": queued}

    def ids(self, api, query: str) -> set:
        response = api.get(f"{JOBS}?{query}")
        assert response.status_code == 200, response.content
        return {job["id"] for job in response.json()["results"]}

    def test_state_takes_repeats_and_commas(self, renter_api, jobs):
        both = {str(jobs["old"].pk), str(jobs["done"].pk)}
        assert self.ids(renter_api, "state=failed&state=succeeded") == both
        assert self.ids(renter_api, "state=failed,succeeded") == both
        assert self.ids(renter_api, "state=queued") == {str(jobs["queued"].pk)}

    def test_created_after_and_before_bound_the_creation_time(self, renter_api, jobs):
        assert self.ids(renter_api, "created_after=2026-02-01&created_before=2026-03-01T00:00:01Z") == {
            str(jobs["done"].pk)
        }
        assert self.ids(renter_api, "created_before=2026-02-01") == {str(jobs["old"].pk)}

    def test_any_utc_offset_python_reads_is_taken(self, renter_api, jobs):
        # PostgreSQL refuses offsets beyond ±15:59; the bound is compared in UTC (the live fuzzer found this).
        assert self.ids(renter_api, "created_after=2026-01-31T07:01:00-16:59") == self.ids(
            renter_api, "created_after=2026-02-01T00:00:00Z"
        )

    def test_name_matches_a_part_in_any_case(self, renter_api, jobs):
        assert self.ids(renter_api, "name=SWEEP") == {str(jobs["old"].pk), str(jobs["queued"].pk)}

    @pytest.mark.parametrize(
        ("query", "parameter"),
        [
            ("state=sleeping", "state"),
            ("created_after=yesterday", "created_after"),
            ("created_before=2026-13-01", "created_before"),
            ("created_after=0001-01-01T00:00:00+05:00", "created_after"),
        ],
    )
    def test_a_bad_value_is_a_problem_naming_the_parameter(self, renter_api, jobs, query, parameter):
        body = problem_of(renter_api.get(f"{JOBS}?{query}"), 400)
        assert list(body["errors"]) == [parameter]

    def test_a_filter_does_not_hide_a_job_from_its_detail_url(self, renter_api, jobs):
        assert renter_api.get(f"{JOBS}/{jobs['queued'].pk}?state=failed").status_code == 200

    def test_the_filtered_list_costs_the_same_queries_for_1_or_20_jobs(
        self, renter_api, renter, shed, django_assert_max_num_queries
    ):
        def count() -> int:
            with CaptureQueriesContext(connection) as queries:
                assert renter_api.get(f"{JOBS}?state=placed,queued&name=n").status_code == 200
            return len(queries)

        job_place(job_id=job_make(renter, name="n0").pk)
        one = count()
        for i in range(19):
            job = job_make(renter, name=f"n{i + 1}")
            if i < 1:
                job_place(job_id=job.pk)
        assert renter_api.get(f"{JOBS}?state=placed,queued&name=n").json()["count"] == 20
        with django_assert_max_num_queries(one):
            assert renter_api.get(f"{JOBS}?state=placed,queued&name=n").status_code == 200


class TestEvents:
    def test_the_timeline_is_oldest_first_and_names_no_one_else(self, renter_api, renter, stranger, placed):
        job = placed.job
        other = job_make(stranger)
        AuditEvent.objects.create(
            action="job.preempted",
            subject_id=job.pk,
            actor="placement",
            data={"allocation": str(placed.pk), "unit": str(placed.unit_id), "for_job": str(other.pk)},
        )
        AuditEvent.objects.create(action="ledger.usage_posted", subject_id=job.pk, data={"key": "usage:x:1"})
        job_cancel(job=job, actor="user:999999")

        body = renter_api.get(url(job, "events")).json()

        events = body["results"]
        actions = ["job.submitted", "job.placed", "job.preempted", "job.cancelled", "allocation.released"]
        assert body["count"] == len(events) == 5
        assert [e["action"] for e in events] == actions
        assert [e["actor"] for e in events] == ["renter", "placement", "placement", "staff", "system"]
        assert [e["at"] for e in events] == sorted(e["at"] for e in events)
        placed_detail = events[1]["detail"]
        assert placed_detail["allocation"] == str(placed.pk)
        assert placed_detail["unit"] == str(placed.unit_id)
        assert placed_detail["price_per_gpu_hour"] == f"{placed.price_per_gpu_hour_micros / 1_000_000:.6f}"
        assert "policy" in placed_detail and "slices" not in placed_detail
        assert events[2]["detail"] == {"allocation": str(placed.pk), "unit": str(placed.unit_id)}
        assert events[3]["detail"] == {"previous": "placed"}
        assert events[4]["detail"] == {"allocation": str(placed.pk), "reason": "cancelled"}
        assert str(other.pk) not in str(body) and "999999" not in str(body)

    def test_the_timeline_is_paginated(self, renter_api, placed):
        body = renter_api.get(url(placed.job, "events") + "?limit=1&offset=1").json()
        assert body["count"] == 2
        assert [e["action"] for e in body["results"]] == ["job.placed"]


class TestLogs:
    def test_pages_run_across_allocations_in_order(self, renter_api, placed):
        log_chunk_record(allocation=placed, offset=6, data="world\n")
        log_chunk_record(allocation=placed, offset=0, data="hello ")

        first = renter_api.get(url(placed.job, "logs") + "?limit_bytes=8").json()
        rest = renter_api.get(url(placed.job, "logs") + f"?offset={first['next_offset']}").json()

        assert first == {"offset": 0, "next_offset": 8, "data": "hello wo", "complete": False}
        assert rest == {"offset": 8, "next_offset": 12, "data": "rld\n", "complete": False}

    def test_offsets_count_bytes_and_never_split_a_character(self, renter_api, placed):
        log_chunk_record(allocation=placed, offset=0, data="été\n")  # é is two bytes

        first = renter_api.get(url(placed.job, "logs") + "?limit_bytes=2").json()
        inside = renter_api.get(url(placed.job, "logs") + "?offset=1")

        assert first["data"] == "é" and first["next_offset"] == 2
        assert problem_of(inside, 400)["errors"] == {"offset": [inside.json()["errors"]["offset"][0]]}

    def test_plain_text_by_format_or_accept(self, renter_api, placed):
        log_chunk_record(allocation=placed, offset=0, data="line one\n")

        by_format = renter_api.get(url(placed.job, "logs") + "?format=txt&offset=5")
        by_accept = renter_api.get(url(placed.job, "logs"), HTTP_ACCEPT="text/plain")

        assert by_format["Content-Type"].startswith("text/plain")
        assert by_format.content == b"one\n"
        assert (by_format["X-Log-Offset"], by_format["X-Log-Next-Offset"], by_format["X-Log-Complete"]) == (
            "5",
            "9",
            "false",
        )
        assert by_accept.content == b"line one\n"

    def test_wait_0_answers_at_once_and_complete_flips_when_the_job_ends(self, renter_api, placed):
        log_chunk_record(allocation=placed, offset=0, data="done\n")
        started = datetime.now()
        before = renter_api.get(url(placed.job, "logs") + "?wait=0&offset=5").json()
        assert datetime.now() - started < timedelta(seconds=2)
        job_cancel(job=placed.job, actor="test")

        after = renter_api.get(url(placed.job, "logs") + "?offset=5").json()
        earlier = renter_api.get(url(placed.job, "logs") + "?limit_bytes=2").json()

        assert before["complete"] is False and before["data"] == ""
        assert after == {"offset": 5, "next_offset": 5, "data": "", "complete": True}
        assert earlier["complete"] is False  # more is stored past this page

    @pytest.fixture
    def looks(self, monkeypatch):
        """Every look of a waiting log read, quick; ``looks.then[n]`` runs at the n-th look."""
        monkeypatch.setattr(job_reads, "LOG_POLL_S", 0.01)
        real, seen = job_reads.job_log_ready, Looks()
        seen.then = {}

        def look(job, *, offset):
            seen.append(offset)
            seen.then.get(len(seen), lambda: None)()  # noqa: B023
            return real(job, offset=offset)

        monkeypatch.setattr(job_reads, "job_log_ready", look)
        return seen

    def test_wait_returns_when_the_job_ends_meanwhile(self, renter_api, placed, looks):
        looks.then[3] = lambda: Job.objects.filter(pk=placed.job_id).update(state=Job.State.SUCCEEDED)

        body = renter_api.get(url(placed.job, "logs") + "?wait=25").json()

        assert len(looks) == 3  # the first look, then two while waiting; the third saw the end
        assert body == {"offset": 0, "next_offset": 0, "data": "", "complete": True}

    def test_wait_returns_when_output_arrives(self, renter_api, placed, looks):
        looks.then[2] = lambda: log_chunk_record(allocation=placed, offset=0, data="new\n")

        body = renter_api.get(url(placed.job, "logs") + "?wait=25&format=json").json()

        assert len(looks) == 2 and body["data"] == "new\n"

    def test_a_key_beyond_its_wait_cap_is_answered_at_once(self, renter_api, placed, looks, settings):
        settings.LONG_POLL_WAITS_PER_KEY = 2
        held = longpoll.wait_slots_take({"key:other": 2}, seconds=30)  # another key's slots do not count
        for n in range(2):  # as if two waits of this key were in flight
            assert cache.add(f"long-poll:key:{renter_api.key_pk}:{n}", 1, 30)

        body = renter_api.get(url(placed.job, "logs") + "?wait=25").json()

        assert len(looks) == 1 and body["data"] == "" and held is not None

    def test_a_wait_gives_its_slot_back(self, renter_api, placed, looks, settings):
        settings.LONG_POLL_WAITS_PER_KEY = 1
        looks.then[2] = lambda: log_chunk_record(allocation=placed, offset=0, data="a\n")

        renter_api.get(url(placed.job, "logs") + "?wait=25")
        looks.then = {3: lambda: log_chunk_record(allocation=placed, offset=2, data="b\n")}
        body = renter_api.get(url(placed.job, "logs") + "?wait=25&offset=2").json()

        assert len(looks) == 3 and body["data"] == "b\n"  # the second one waited: the slot was free again
        assert not cache.get(f"long-poll:key:{renter_api.key_pk}:0")

    @pytest.mark.parametrize("query", ["wait=26", "offset=-1", "limit_bytes=0"])
    def test_bad_parameters_are_problems(self, renter_api, placed, query):
        assert problem_of(renter_api.get(url(placed.job, "logs") + f"?{query}"), 400)["errors"]


class TestUsage:
    def test_usage_sums_the_allocations(self, renter_api, renter, placed, settings):
        wallet_credit_promotional(user=renter, amount_micros=100_000_000, key="promo:usage")
        at = datetime.now(UTC)
        allocation_since(placed, at - timedelta(hours=1))
        usage_record(allocation=placed, samples=[SampleReport(seq=1, gpu_ms=1_800_000, recorded_at=at)])
        usage_post(allocation_id=placed.pk)
        usage_record(allocation=placed, samples=[SampleReport(seq=2, gpu_ms=1_800_000, recorded_at=at)])

        body = renter_api.get(url(placed.job, "usage")).json()

        price = placed.price_per_gpu_hour_micros
        charged = price * 2 * 1_800_000 // (3_600_000 * 2)  # half a GPU-hour charged, the rest not yet posted
        assert body["gpu_seconds"] == 3600
        assert body["currency"] == settings.CURRENCY
        assert body["price_per_gpu_hour"] == f"{price / 1_000_000:.6f}"
        assert body["cost"] == f"{charged / 1_000_000:.6f}"
        [allocation] = body["allocations"]
        assert allocation["id"] == str(placed.pk) and allocation["unit"] == str(placed.unit_id)
        assert (allocation["gpu_seconds"], allocation["cost"], allocation["released"]) == (3600, body["cost"], None)

    def test_a_queued_job_has_no_usage(self, renter_api, renter):
        body = renter_api.get(url(job_make(renter), "usage")).json()
        assert body["allocations"] == [] and body["price_per_gpu_hour"] is None and body["cost"] == "0.000000"


PARTS = ["events", "logs", "usage"]


@pytest.mark.parametrize("part", PARTS)
def test_another_renters_job_is_not_found(stranger_api, placed, part):
    log_chunk_record(allocation=placed, offset=0, data="secret\n")
    response = stranger_api.get(url(placed.job, part))
    problem_of(response, 404)
    assert b"secret" not in response.content


@pytest.mark.parametrize("part", PARTS)
def test_the_owner_of_the_job_can_read_it(renter_api, placed, part):
    assert renter_api.get(url(placed.job, part)).status_code == 200


@pytest.mark.parametrize("part", PARTS)
def test_anonymous_is_unauthorised(placed, part):
    problem_of(APIClient().get(url(placed.job, part)), 401)
