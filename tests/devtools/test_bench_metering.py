"""``manage.py bench metering`` at a smoke size on PostgreSQL: what it charged equals what the
samples it fed should cost, and its Stripe calls follow renters and hours, not samples. A
benchmark, so nothing here is timed; only its bookkeeping is checked."""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)

needs_postgresql = pytest.mark.pg
SMALL = ["--renters", "8", "--postpaid-every", "2", "--units", "6", "--allocations", "12", "--hours", "2"]


def bench(*args) -> dict:
    out = StringIO()
    call_command("bench", "metering", *args, stdout=out)
    return json.loads(out.getvalue())


@needs_postgresql
def test_the_charge_is_exactly_the_cost_of_the_samples_fed_and_stripe_calls_do_not_follow_samples():
    few = bench("--samples", "600", "--batch", "10", *SMALL)
    many = bench("--samples", "2400", "--batch", "10", *SMALL)

    for result in (few, many):
        assert result["charged_micros"] == result["expected_micros"] > 0
        assert result["metered_micros"] == result["expected_metered_micros"] > 0
        assert result["ledger_sum"] == 0
        assert result["duplicates_ignored"] > 0
        assert 0 < result["stripe_calls"] <= result["postpaid_renters"] * result["hours_covered"]
    assert (few["samples"], many["samples"]) == (600, 2400)
    assert many["ledger_postings"] > few["ledger_postings"]
    assert many["stripe_calls"] <= few["postpaid_renters"] * few["hours_covered"]


def test_on_sqlite_it_says_it_needs_postgresql():
    if connection.vendor == "postgresql":
        pytest.skip("this checks the message on SQLite")
    with pytest.raises(CommandError, match="needs PostgreSQL"):
        bench("--samples", "1")
