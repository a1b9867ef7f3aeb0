"""``manage.py bench retention`` at a smoke size on PostgreSQL: the retention tasks shrink every
table they own, leave the ledger as it was, and keep the weeks with unrated usage. A benchmark,
so nothing here is timed; only its bookkeeping is checked."""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)

SMALL = ["--samples", "6000", "--allocations", "120", "--unrated-every", "40", "--audit", "3000",
         "--outbox", "1000", "--webhooks", "1000", "--logs", "1200"]  # fmt: skip


def bench(*args) -> dict:
    out = StringIO()
    call_command("bench", "retention", *args, stdout=out)
    return json.loads(out.getvalue())


@pytest.mark.pg
def test_the_tasks_shrink_what_they_own_and_leave_the_ledger():
    result = bench(*SMALL)
    before, after, steps = result["before"], result["after"], result["steps"]

    for table in ("usage_samples", "log_chunks", "audit_events", "outbox_messages", "webhook_events"):
        assert after[table]["rows"] < before[table]["rows"], table
    assert after["ledger_entries"] == before["ledger_entries"]
    assert after["usage_hours"]["rows"] == steps["usage_roll_up"]["did"]["hours"] > 0
    assert steps["usage_roll_up"]["did"]["unrated"] > 0
    assert steps["usage_partitions"]["did"]["dropped"] and steps["usage_partitions"]["did"]["kept"]
    assert after["usage_partitions"] == before["usage_partitions"] - len(steps["usage_partitions"]["did"]["dropped"])
    assert steps["audit_archive"]["did"] == before["audit_events"]["rows"] - after["audit_events"]["rows"]


def test_on_sqlite_it_says_it_needs_postgresql():
    if connection.vendor == "postgresql":
        pytest.skip("runs on SQLite")
    with pytest.raises(CommandError, match="needs PostgreSQL"):
        bench(*SMALL)
