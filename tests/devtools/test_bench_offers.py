"""``manage.py bench offers`` at a smoke size on PostgreSQL: it builds its own scratch database, runs
its mix of searches through the API and reports latencies. A benchmark, so nothing is timed here;
only that every search answered and the report has its shape."""

import json
import os
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from marketplace.devtools.bench.offers import MIX

pytestmark = pytest.mark.django_db(transaction=True)


def bench(*args) -> dict:
    out = StringIO()
    call_command("bench", "offers", *args, stdout=out)
    return json.loads(out.getvalue())


@pytest.mark.pg
def test_the_mix_of_searches_runs_through_the_api_and_reports_latencies():
    result = bench("--units", "60", "--gpus-per-unit", "2", "--repeats", "2")

    assert result["units"] == 60 and result["churn_per_search"] == 20
    assert set(result["per_query"]) == set(MIX)
    assert result["queries"] >= 2 * len(MIX)
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert all(0 < times["p50_ms"] <= times["p99_ms"] for times in result["per_query"].values())
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [f"shedshare_bench_{os.getpid()}"])
        assert cursor.fetchone()[0] == 0, "the scratch database is dropped"


def test_on_sqlite_it_says_it_needs_postgresql():
    if connection.vendor == "postgresql":
        pytest.skip("this checks the message on SQLite")
    with pytest.raises(CommandError, match="needs PostgreSQL"):
        bench("--units", "1")
