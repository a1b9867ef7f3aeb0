"""``manage.py bench relay`` at a smoke size on PostgreSQL: a real connection server, a job and
the agent's stream as processes, every byte through the relay counted. A benchmark, so nothing
here is timed; only that it measured what it says."""

import json
from concurrent.futures import ThreadPoolExecutor
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.pg
def test_the_relay_and_the_direct_path_are_measured_in_one_run():
    out = StringIO()

    # In a thread of its own: the benchmark runs its client on an event loop, and the browser
    # tests' Playwright keeps one running in the main thread.
    def bench() -> None:
        try:
            call_command("bench", "relay", "--streams", "4", "--size-mb", "4", "--requests", "20", stdout=out)
        finally:
            connections.close_all()  # this thread's

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(bench).result()
    result = json.loads(out.getvalue())

    assert result["relay_mb_s"] > 0 and result["direct_mb_s"] > 0
    assert abs(result["relay_share_of_direct"] - result["relay_mb_s"] / result["direct_mb_s"]) < 0.01
    assert 0 < result["relay_p50_ms"] <= result["relay_p99_ms"]
    assert 0 < result["direct_p50_ms"] <= result["direct_p99_ms"]
    assert (result["streams"], result["size_mb"], result["requests"]) == (4, 4, 20)


def test_bench_relay_refuses_sqlite():
    if connection.vendor == "postgresql":
        pytest.skip("refuses SQLite only")
    with pytest.raises(CommandError, match="needs PostgreSQL"):
        call_command("bench", "relay")
