"""``manage.py bench placement`` at a smoke size on PostgreSQL: it builds its own scratch database,
places everything it can with several workers (one killed), and counts double bookings from the
data. A benchmark, so nothing here is timed; only its bookkeeping is checked."""

import json
import os
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)

needs_postgresql = pytest.mark.pg


def bench(*args) -> dict:
    out = StringIO()
    call_command("bench", "placement", *args, stdout=out)
    return json.loads(out.getvalue())


@needs_postgresql
def test_throughput_places_the_backlog_with_several_workers_and_no_double_booking():
    result = bench("--units", "40", "--gpus-per-unit", "4", "--jobs", "60", "--workers", "2", "--pgbench-seconds", "1")

    assert result["mode"] == "throughput"
    assert (result["units"], result["gpus"], result["jobs"], result["workers"]) == (40, 160, 60, 2)
    assert result["double_bookings"] == 0
    assert result["placed"] + result["left_queued"] == 60
    assert result["placed"] > 0 and result["placements_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["pgbench_tps"] is None or result["pgbench_tps"] > 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [f"shedshare_bench_{os.getpid()}"])
        assert cursor.fetchone()[0] == 0, "the scratch database is dropped"


@needs_postgresql
def test_a_worker_killed_mid_run_loses_no_job():
    result = bench(
        "--units", "60", "--gpus-per-unit", "4", "--jobs", "150", "--workers", "3", "--kill-one-after", "0.3",
        "--pgbench-seconds", "0",
    )  # fmt: skip

    assert result["killed_worker"] is True
    assert result["double_bookings"] == 0
    assert result["placed"] + result["left_queued"] == 150
    assert result["left_queued"] == 0 or result["left_queued_why"], "a job left queued says why"


def test_on_sqlite_it_says_it_needs_postgresql():
    if connection.vendor == "postgresql":
        pytest.skip("this checks the message on SQLite")
    with pytest.raises(CommandError, match="needs PostgreSQL"):
        bench("--units", "1")
