"""Statements show each caller their own usage or earnings, grouped by UTC day, job or unit."""

import csv
import io
from datetime import UTC, datetime

import pytest

from billing.models import Account, LedgerTransaction, OutboxMessage, TopUp
from billing.services import account_for, ledger_post, usage_post, wallet_credit_promotional
from billing.topups import topup_create, topup_credit
from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.usage import SampleReport, usage_record
from tests.conftest import JOB_SPEC, ledger_backdate, problem_of, renter_client, unit_online

pytestmark = pytest.mark.django_db

BEFORE = datetime(2026, 1, 5, 9, tzinfo=UTC)
DAY1 = datetime(2026, 1, 10, 12, tzinfo=UTC)
DAY2 = datetime(2026, 1, 11, 23, 30, tzinfo=UTC)
AFTER = datetime(2026, 1, 20, 9, tzinfo=UTC)
RANGE = "from=2026-01-10&to=2026-01-11"
HOUR_MS = 3_600_000


def allocation_on(unit, renter, name: str) -> Allocation:
    job = Job.objects.create(renter=renter, name=name, state=Job.State.RUNNING, **JOB_SPEC)
    since = datetime(2026, 1, 1, tzinfo=UTC)  # before the usage the tests record
    return Allocation.objects.create(
        job=job, unit=unit, price_per_gpu_hour_micros=2_000_000, gpu_count=1, created_at=since
    )


def ran(allocation: Allocation, *, seq: int, gpu_ms: int, at: datetime) -> None:
    """Usage recorded and posted at ``at``: the posting is back-dated, as only a test may."""
    usage_record(allocation=allocation, samples=[SampleReport(seq=seq, gpu_ms=gpu_ms, recorded_at=at)])
    txn = usage_post(allocation_id=allocation.pk)
    ledger_backdate(txn, at)


def backdate(txn: LedgerTransaction, at: datetime) -> None:
    ledger_backdate(txn, at)


@pytest.fixture
def history(owner, renter, stranger, stripe_fake):
    """Rita ran job A for 1 h on day 1 and 0.5 h on day 2, and job B for 1 h on day 2, on two of
    Olivia's units; Sam ran 1 h on Olivia's garden unit on day 1. Rita topped up 20.00 on day 1
    after a 10.00 credit before the range; Olivia was paid 1.00 on day 2."""
    garden = unit_online(owner, name="garden", gpus=1)[0]
    attic = unit_online(owner, name="attic", gpus=1)[0]
    backdate(wallet_credit_promotional(user=renter, amount_micros=10_000_000, key="promo:rita"), BEFORE)
    wallet_credit_promotional(user=stranger, amount_micros=10_000_000, key="promo:sam")

    topup = topup_create(renter=renter, amount_minor=2000)
    topup = topup_credit(topup=topup, payment_intent=stripe_fake.succeed_payment(topup.payment_intent_id))
    backdate(topup.credited, DAY1)

    job_a = allocation_on(garden, renter, "train-a")
    ran(job_a, seq=1, gpu_ms=HOUR_MS, at=DAY1)
    ran(job_a, seq=2, gpu_ms=HOUR_MS // 2, at=DAY2)
    ran(allocation_on(attic, renter, "train-b"), seq=1, gpu_ms=HOUR_MS, at=DAY2)
    ran(allocation_on(garden, stranger, "sams-job"), seq=1, gpu_ms=HOUR_MS, at=DAY1)

    payout = ledger_post(
        key=f"payout:{owner.pk}:2026-01-11",
        kind="payout",
        legs=[
            (account_for(Account.Kind.OWNER_PAYABLE, owner), -1_000_000),
            (account_for(Account.Kind.STRIPE_CLEARING), 1_000_000),
        ],
    )
    backdate(payout, DAY2)
    OutboxMessage.objects.create(
        operation="transfers.create", payload={}, user=owner, ledger_transaction=payout, state="sent", stripe_id="tr_1"
    )
    return {"garden": garden, "attic": attic, "job_a": job_a, "topup": topup}


def earned(micros: int, settings) -> str:
    return f"{(micros - micros * settings.PLATFORM_FEE_PERCENT // 100) / 1_000_000:.6f}"


class TestUsageStatement:
    def test_groups_by_utc_day(self, renter, history):
        body = renter_client(renter).get(f"/api/v1/statements/usage?{RANGE}&group=day").json()

        assert (body["from"], body["to"], body["group"], body["currency"]) == ("2026-01-10", "2026-01-11", "day", "usd")
        assert body["lines"] == [
            {"day": "2026-01-10", "gpu_seconds": "3600.000", "cost": "2.000000"},
            {"day": "2026-01-11", "gpu_seconds": "5400.000", "cost": "3.000000"},
        ]

    def test_groups_by_job(self, renter, history):
        body = renter_client(renter).get(f"/api/v1/statements/usage?{RANGE}&group=job").json()

        assert [(line["job_name"], line["gpu_seconds"], line["cost"]) for line in body["lines"]] == sorted(
            [("train-a", "5400.000", "3.000000"), ("train-b", "3600.000", "2.000000")],
            key=lambda line: str(Job.objects.get(name=line[0]).pk),
        )

    def test_lists_top_ups_and_the_balance_around_the_range(self, renter, history):
        body = renter_client(renter).get(f"/api/v1/statements/usage?{RANGE}").json()

        [topup] = body["top_ups"]
        assert (topup["id"], topup["amount"]) == (str(history["topup"].id), "20.000000")
        assert topup["payment_intent_id"] == TopUp.objects.get().payment_intent_id
        assert body["balance"] == {"opening": "10.000000", "closing": "25.000000", "current": "25.000000"}

    def test_a_day_outside_the_range_is_left_out(self, renter, history):
        body = renter_client(renter).get("/api/v1/statements/usage?from=2026-01-11&to=2026-01-11").json()

        assert [line["day"] for line in body["lines"]] == ["2026-01-11"]
        assert body["top_ups"] == []
        assert body["balance"]["opening"] == "28.000000"

    def test_never_shows_another_renters_usage(self, stranger, history):
        body = renter_client(stranger).get(f"/api/v1/statements/usage?{RANGE}&group=job").json()

        assert [line["job_name"] for line in body["lines"]] == ["sams-job"]
        assert body["top_ups"] == []

    def test_as_csv_by_format_or_accept(self, renter, history):
        api = renter_client(renter)
        for response in (
            api.get(f"/api/v1/statements/usage?{RANGE}&format=csv"),
            api.get(f"/api/v1/statements/usage?{RANGE}", HTTP_ACCEPT="text/csv"),
        ):
            assert response["Content-Type"].startswith("text/csv")
            assert "usage-day-2026-01-10-2026-01-11.csv" in response["Content-Disposition"]
            rows = list(csv.DictReader(io.StringIO(response.content.decode())))
            assert rows == [
                {"day": "2026-01-10", "gpu_seconds": "3600.000", "cost": "2.000000"},
                {"day": "2026-01-11", "gpu_seconds": "5400.000", "cost": "3.000000"},
            ]

    def test_a_csv_never_hands_a_spreadsheet_a_formula(self, renter, history):
        Job.objects.filter(name="train-a").update(name="=HYPERLINK(1)")

        response = renter_client(renter).get(f"/api/v1/statements/usage?{RANGE}&group=job&format=csv")

        names = [row["job_name"] for row in csv.DictReader(io.StringIO(response.content.decode()))]
        assert sorted(names) == ["'=HYPERLINK(1)", "train-b"]

    def test_defaults_to_the_last_30_days(self, renter, history):
        body = renter_client(renter).get("/api/v1/statements/usage?to=2026-01-11").json()
        assert body["from"] == "2025-12-13"
        assert len(body["lines"]) == 2


class TestEarningsStatement:
    def test_groups_by_unit_from_the_owner_payable_legs(self, owner, history, settings):
        body = renter_client(owner).get(f"/api/v1/statements/earnings?{RANGE}&group=unit").json()

        assert body["lines"] == [
            {"unit_id": str(history["attic"].pk), "unit_name": "attic", "earned": earned(2_000_000, settings)},
            {"unit_id": str(history["garden"].pk), "unit_name": "garden", "earned": earned(5_000_000, settings)},
        ]

    def test_groups_by_day_and_lists_payouts_with_their_transfer(self, owner, history, settings):
        body = renter_client(owner).get(f"/api/v1/statements/earnings?{RANGE}&group=day").json()

        assert body["lines"] == [
            {"day": "2026-01-10", "earned": earned(4_000_000, settings)},
            {"day": "2026-01-11", "earned": earned(3_000_000, settings)},
        ]
        [payout] = body["payouts"]
        assert (payout["amount"], payout["transfer_state"], payout["transfer_id"], payout["reversed"]) == (
            "1.000000",
            "sent",
            "tr_1",
            False,
        )
        total = 7_000_000 - 7_000_000 * settings.PLATFORM_FEE_PERCENT // 100  # per posting, rounded down
        assert body["balance"]["opening"] == "0.000000"
        assert body["balance"]["closing"] == body["balance"]["current"]
        assert abs(float(body["balance"]["current"]) - (total - 1_000_000) / 1e6) < 1e-5

    def test_a_renter_with_no_units_sees_no_earnings(self, renter, stranger, history):
        for user in (renter, stranger):
            body = renter_client(user).get(f"/api/v1/statements/earnings?{RANGE}&group=unit").json()
            assert (body["lines"], body["payouts"]) == ([], [])


class TestBadRequests:
    @pytest.mark.parametrize(
        ("query", "parameter"),
        [
            ("from=2026-13-01", "from"),
            ("to=yesterday", "to"),
            ("from=2026-01-11&to=2026-01-10", "from"),
            ("from=2020-01-01&to=2026-01-10", "from"),
            ("group=unit", "group"),
        ],
    )
    def test_a_bad_parameter_is_a_problem_naming_it(self, renter_api, query, parameter):
        body = problem_of(renter_api.get(f"/api/v1/statements/usage?{query}"), 400)
        assert list(body["errors"]) == [parameter]

    def test_a_bad_date_in_csv_is_still_a_problem(self, renter_api):
        body = problem_of(renter_api.get("/api/v1/statements/earnings?from=nope&format=csv"), 400)
        assert list(body["errors"]) == ["from"]

    def test_needs_a_login(self, client):
        assert client.get("/api/v1/statements/usage").status_code in (401, 403)


class TestQueryCounts:
    @pytest.mark.parametrize(
        "path", ["usage?group=day", "usage?group=job", "earnings?group=day", "earnings?group=unit"]
    )
    def test_a_statement_takes_a_fixed_number_of_queries(
        self, owner, renter, history, django_assert_max_num_queries, path
    ):
        user = owner if path.startswith("earnings") else renter
        api = renter_client(user)
        # Two to authenticate, five for the statement (usage: samples, and the hours rolled up
        # from older ones); more jobs, units and days add none.
        for n in range(5):
            ran(allocation_on(history["garden"], renter, f"extra-{n}"), seq=1, gpu_ms=HOUR_MS, at=DAY1)
        with django_assert_max_num_queries(7):
            response = api.get(f"/api/v1/statements/{path}&{RANGE}")
        assert response.status_code == 200
