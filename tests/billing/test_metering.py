"""Metering turns usage samples into balanced ledger postings, once, whatever order they arrive in."""

from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from billing import tasks as billing_tasks
from billing.meters import meter_events_enqueue
from billing.models import Account, BillingProfile, LedgerEntry, LedgerTransaction, OutboxMessage, RatingClock
from billing.selectors import wallet_balance_micros
from billing.services import (
    UnbalancedTransaction,
    account_balance,
    account_for,
    ledger_post,
    usage_post,
    usage_rate,
    usage_rate_since,
    wallet_credit_promotional,
)
from marketplace.jobs.models import Allocation, Job, UsageSample
from marketplace.jobs.selectors import allocation_usage
from marketplace.jobs.usage import SampleReport, usage_record
from marketplace.kernel.money import usage_cost_micros
from tests.conftest import JOB_SPEC, unit_online

AT = datetime(2026, 1, 1, tzinfo=UTC)


def allocation_make(renter, unit, *, price: int = 2_000_000) -> Allocation:
    """A running job's allocation, active since well before the usage the tests record at AT."""
    job = Job.objects.create(renter=renter, state=Job.State.RUNNING, **JOB_SPEC)
    return Allocation.objects.create(
        job=job, unit=unit, price_per_gpu_hour_micros=price, gpu_count=1, created_at=AT - timedelta(days=30)
    )


def samples(*gpu_ms: int, first: int = 1) -> list[SampleReport]:
    return [SampleReport(seq=first + i, gpu_ms=ms, recorded_at=AT) for i, ms in enumerate(gpu_ms)]


def ledger_total() -> int:
    return LedgerEntry.objects.aggregate(total=Sum("amount_micros"))["total"] or 0


def balance(kind: str, user=None) -> int:
    return account_balance(account_for(kind, user))


@pytest.fixture
def unit(owner):
    return unit_online(owner, name="shed", gpus=1)[0]


@pytest.fixture
def allocation(renter, unit):
    return allocation_make(renter, unit)


class TestCharge:
    def test_usage_is_charged_at_the_locked_price_rounded_down(self, allocation, renter):
        usage_record(allocation=allocation, samples=samples(1_000_000, 234_567))

        txn = usage_post(allocation_id=allocation.pk)

        # 1,234,567 GPU-ms at 2,000,000 micros per GPU-hour is 685,870.55 micros.
        assert txn is not None
        assert balance(Account.Kind.RENTER_WALLET, renter) == -685_870
        assert allocation_usage(allocation) == (1_234_567, 685_870)

    def test_the_charge_is_split_between_owner_and_platform(self, allocation, owner):
        usage_record(allocation=allocation, samples=samples(1_234_567))

        txn = usage_post(allocation_id=allocation.pk)

        legs = {entry.account.kind: entry.amount_micros for entry in txn.entries.select_related("account")}
        fee = 685_870 * settings.PLATFORM_FEE_PERCENT // 100
        assert legs == {
            Account.Kind.RENTER_WALLET: -685_870,
            Account.Kind.OWNER_PAYABLE: 685_870 - fee,
            Account.Kind.PLATFORM_FEES: fee,
        }
        assert sum(legs.values()) == 0
        assert balance(Account.Kind.OWNER_PAYABLE, owner) == 685_870 - fee
        assert txn.allocation == allocation
        assert txn.kind == "usage"

    def test_posting_twice_charges_once(self, allocation, renter):
        usage_record(allocation=allocation, samples=samples(3_600_000))
        usage_post(allocation_id=allocation.pk)

        assert usage_post(allocation_id=allocation.pk) is None

        assert LedgerTransaction.objects.filter(allocation=allocation).count() == 1
        assert balance(Account.Kind.RENTER_WALLET, renter) == -2_000_000

    def test_later_usage_charges_only_the_difference(self, allocation, renter):
        usage_record(allocation=allocation, samples=samples(1_000))
        usage_post(allocation_id=allocation.pk)
        usage_record(allocation=allocation, samples=samples(1_000, first=2))

        usage_post(allocation_id=allocation.pk)

        # Each 1,000 GPU-ms alone is 555.5 micros; together they are 1,111.1, not 555 + 555.
        assert balance(Account.Kind.RENTER_WALLET, renter) == -1_111
        assert LedgerTransaction.objects.filter(allocation=allocation).count() == 2

    def test_no_usage_posts_nothing(self, allocation):
        assert usage_post(allocation_id=allocation.pk) is None

        assert not LedgerTransaction.objects.exists()

    def test_usage_too_small_to_cost_a_micro_posts_nothing(self, allocation):
        usage_record(allocation=allocation, samples=samples(1))

        assert usage_post(allocation_id=allocation.pk) is None

    def test_duplicates_are_reported_and_not_stored(self, allocation):
        usage_record(allocation=allocation, samples=samples(10, 20))

        assert usage_record(allocation=allocation, samples=samples(10, 20, 30)) == (1, 2)

        assert UsageSample.objects.filter(allocation=allocation).count() == 3

    def test_the_wallet_pays_for_usage(self, allocation, renter):
        wallet_credit_promotional(user=renter, amount_micros=5_000_000, key="welcome")
        usage_record(allocation=allocation, samples=samples(3_600_000))

        usage_post(allocation_id=allocation.pk)

        assert wallet_balance_micros(renter) == 3_000_000

    def test_recording_new_usage_asks_for_a_posting(self, allocation, django_capture_on_commit_callbacks):
        with django_capture_on_commit_callbacks() as enqueued:
            usage_record(allocation=allocation, samples=samples(10))
        with django_capture_on_commit_callbacks() as again:
            usage_record(allocation=allocation, samples=samples(10))

        assert len(enqueued) == 1
        assert again == []

    def test_with_a_posting_interval_the_sweep_posts_running_jobs_in_bulk(self, allocation, renter, settings):
        settings.USAGE_POSTING_INTERVAL_S = 15
        other = allocation_make(renter, allocation.unit, price=3_600_000)
        since = timezone.now()
        usage_record(allocation=allocation, samples=samples(60_000, 60_000))
        usage_record(allocation=other, samples=samples(1_000))

        postings, renters = usage_rate_since(since)

        assert len(postings) == 2 and renters == {renter.pk}
        assert allocation_usage(allocation) == (120_000, 120_000 * 2_000_000 // 3_600_000)
        assert allocation_usage(other) == (1_000, 1_000)
        assert usage_rate_since(since) == ([], set())  # nothing new: nothing posted twice
        usage_record(allocation=allocation, samples=samples(30_000, first=3))
        (more,), _ = usage_rate_since(since)
        assert more.allocation_id == allocation.pk
        assert allocation_usage(allocation)[1] == 150_000 * 2_000_000 // 3_600_000

    def test_the_sweep_makes_up_for_sweeps_an_outage_cost(self, allocation, settings):
        """Usage that arrived before a long outage, whose posting task was lost with it, is rated
        by the first sweep after it: the sweep starts from its last success, not a fixed window."""
        settings.USAGE_POSTING_INTERVAL_S = 15
        outage_began = timezone.now() - timedelta(minutes=10)
        RatingClock.objects.create(pk=1, rated_from=outage_began)
        usage_record(allocation=allocation, samples=samples(60_000))
        UsageSample.objects.filter(allocation=allocation).update(received_at=outage_began + timedelta(seconds=5))

        billing_tasks.usage_rate_sweep()

        assert allocation_usage(allocation) == (60_000, 60_000 * 2_000_000 // 3_600_000)
        assert RatingClock.objects.get().rated_from > outage_began + timedelta(minutes=9)

    def test_the_first_sweep_rates_the_last_few_intervals(self, allocation, settings):
        settings.USAGE_POSTING_INTERVAL_S = 15
        usage_record(allocation=allocation, samples=samples(60_000))

        billing_tasks.usage_rate_sweep()

        assert allocation_usage(allocation)[1] == 60_000 * 2_000_000 // 3_600_000

    def test_bulk_rating_and_single_posting_agree_and_never_double_charge(self, allocation, renter):
        usage_record(allocation=allocation, samples=samples(7_000, 11_000))
        usage_post(allocation_id=allocation.pk)
        usage_record(allocation=allocation, samples=samples(13_000, first=3))

        usage_rate([allocation.pk, allocation.pk])
        usage_post(allocation_id=allocation.pk)

        expected = usage_cost_micros(gpu_ms=31_000, price_per_gpu_hour_micros=2_000_000)
        assert allocation_usage(allocation) == (31_000, expected)
        assert wallet_balance_micros(renter) == -expected
        assert LedgerEntry.objects.aggregate(total=Sum("amount_micros"))["total"] == 0


class TestLedger:
    def test_unbalanced_legs_are_refused(self, renter):
        wallet = account_for(Account.Kind.RENTER_WALLET, renter)
        losses = account_for(Account.Kind.PLATFORM_LOSSES)

        with pytest.raises(UnbalancedTransaction):
            ledger_post(key="bad", kind="promotion", legs=[(wallet, 100), (losses, -99)])

        assert not LedgerTransaction.objects.exists()
        assert not LedgerEntry.objects.exists()

    def test_a_repeated_key_posts_once(self, renter):
        first = wallet_credit_promotional(user=renter, amount_micros=1_000_000, key="welcome")

        again = wallet_credit_promotional(user=renter, amount_micros=1_000_000, key="welcome")

        assert again.pk == first.pk
        assert wallet_balance_micros(renter) == 1_000_000

    def test_the_ledger_sums_to_zero_after_everything(self, renter, stranger, unit):
        wallet_credit_promotional(user=renter, amount_micros=7_000_000, key="a")
        wallet_credit_promotional(user=stranger, amount_micros=3_000_000, key="b")
        for user, ms in ((renter, 5_432_109), (stranger, 999), (renter, 3_600_000)):
            allocation = allocation_make(user, unit, price=1_234_567)
            usage_record(allocation=allocation, samples=samples(ms, ms // 3))
            usage_post(allocation_id=allocation.pk)
            usage_post(allocation_id=allocation.pk)

        assert LedgerTransaction.objects.count() == 5
        assert ledger_total() == 0
        for txn in LedgerTransaction.objects.all():
            assert txn.entries.aggregate(total=Sum("amount_micros"))["total"] == 0


sample_sets = st.dictionaries(
    keys=st.integers(min_value=1, max_value=100_000),
    values=st.integers(min_value=0, max_value=64 * 3_600_000),
    min_size=1,
    max_size=25,
)


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    distinct=sample_sets,
    price=st.integers(min_value=0, max_value=50_000_000),
    data=st.data(),
)
def test_order_and_duplicates_never_change_the_bill(renter, unit, distinct, price, data):
    """Whatever order the samples arrive in, however often, and however they are batched and
    posted, the renter pays the cost of the distinct samples exactly once."""
    items = sorted(distinct.items())
    repeats = data.draw(st.lists(st.sampled_from(items), max_size=len(items) * 2), label="duplicates")
    delivery = data.draw(st.permutations(items + repeats), label="delivery")
    cuts = sorted(data.draw(st.sets(st.integers(0, len(delivery)), max_size=5), label="batch cuts"))
    batches = [delivery[a:b] for a, b in zip([0, *cuts], [*cuts, len(delivery)], strict=True) if b > a]

    with transaction.atomic():
        allocation = allocation_make(renter, unit, price=price)
        for batch in batches:
            usage_record(allocation=allocation, samples=[SampleReport(s, ms, AT) for s, ms in batch])
            usage_post(allocation_id=allocation.pk)
        usage_post(allocation_id=allocation.pk)

        expected = usage_cost_micros(gpu_ms=sum(distinct.values()), price_per_gpu_hour_micros=price)
        assert allocation_usage(allocation) == (sum(distinct.values()), expected)
        assert balance(Account.Kind.RENTER_WALLET, renter) == -expected
        earned = balance(Account.Kind.OWNER_PAYABLE, unit.owner) + balance(Account.Kind.PLATFORM_FEES)
        assert earned == expected
        assert ledger_total() == 0
        transaction.set_rollback(True)


@hypothesis_settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    gpu_ms=st.integers(min_value=1, max_value=64 * 3_600_000),
    price=st.integers(min_value=1, max_value=50_000_000),
    fee_percent=st.integers(min_value=0, max_value=100),
)
def test_the_fee_split_creates_and_loses_no_unit(renter, unit, gpu_ms, price, fee_percent):
    """Whatever the amount and the platform's percentage, the owner's and the platform's shares
    add up to exactly what the renter is charged, and the posting's legs sum to zero."""
    with transaction.atomic(), override_settings(PLATFORM_FEE_PERCENT=fee_percent):
        allocation = allocation_make(renter, unit, price=price)
        usage_record(allocation=allocation, samples=samples(gpu_ms))

        txn = usage_post(allocation_id=allocation.pk)

        charge = usage_cost_micros(gpu_ms=gpu_ms, price_per_gpu_hour_micros=price)
        kinds = (Account.Kind.RENTER_WALLET, Account.Kind.OWNER_PAYABLE, Account.Kind.PLATFORM_FEES)
        legs = dict.fromkeys(kinds, 0)
        for entry in txn.entries.select_related("account") if txn else []:
            legs[entry.account.kind] += entry.amount_micros
        assert legs[Account.Kind.RENTER_WALLET] == -charge
        assert legs[Account.Kind.OWNER_PAYABLE] + legs[Account.Kind.PLATFORM_FEES] == charge
        assert 0 <= legs[Account.Kind.PLATFORM_FEES] <= charge * fee_percent / 100
        assert sum(legs.values()) == 0
        transaction.set_rollback(True)


class TestBatchIngest:
    def test_a_sample_repeated_within_a_batch_counts_once_and_the_first_wins(self, allocation):
        batch = [SampleReport(1, 100, AT), SampleReport(2, 200, AT), SampleReport(1, 999, AT)]

        assert usage_record(allocation=allocation, samples=batch) == (2, 1)

        assert allocation_usage(allocation)[0] == 300

    def test_a_large_batch_is_stored_whole_in_one_call(self, allocation, django_capture_on_commit_callbacks):
        with django_capture_on_commit_callbacks() as enqueued:
            result = usage_record(allocation=allocation, samples=samples(*[10] * 2500))

        assert result == (2500, 0)
        assert UsageSample.objects.filter(allocation=allocation).count() == 2500
        assert len(enqueued) == 1, "one posting request per batch"


HOUR = datetime(2026, 1, 1, 10, tzinfo=UTC)


def meter_values() -> list[tuple[str, int]]:
    rows = OutboxMessage.objects.filter(operation="billing.meter_events.create").order_by("created_at")
    return [(row.payload["identifier"], int(row.payload["payload"]["value"])) for row in rows]


class TestMeterEvents:
    @pytest.fixture
    def postpaid(self, renter):
        BillingProfile.objects.create(user=renter, postpaid=True, stripe_customer_id="cus_rita")
        return renter

    def test_an_hour_of_usage_is_one_event_with_a_deterministic_identifier(self, postpaid, allocation):
        usage_record(allocation=allocation, samples=[SampleReport(1, 1_800_000, HOUR + timedelta(minutes=30))])

        assert meter_events_enqueue(hour_start=HOUR) == 1

        message = OutboxMessage.objects.get()
        assert message.operation == "billing.meter_events.create"
        assert message.user == postpaid
        assert message.payload == {
            "event_name": "gpu_usage",
            "identifier": f"{postpaid.pk}:2026-01-01T10:00:00+00:00",
            "timestamp": int(HOUR.timestamp()),
            "payload": {"stripe_customer_id": "cus_rita", "value": "1000000"},
        }

    def test_running_twice_for_the_same_hour_writes_no_second_event(self, postpaid, allocation):
        usage_record(allocation=allocation, samples=[SampleReport(1, 1_800_000, HOUR)])
        meter_events_enqueue(hour_start=HOUR)
        usage_record(allocation=allocation, samples=[SampleReport(2, 1_800_000, HOUR)])

        assert meter_events_enqueue(hour_start=HOUR) == 0

        assert meter_values() == [(f"{postpaid.pk}:{HOUR.isoformat()}", 1_000_000)]

    def test_a_sample_that_arrives_after_its_hour_was_reported_is_billed_the_next_hour(self, postpaid, allocation):
        usage_record(allocation=allocation, samples=[SampleReport(1, 1_800_000, HOUR)])
        meter_events_enqueue(hour_start=HOUR)
        late = SampleReport(2, 900_000, HOUR + timedelta(minutes=59))
        usage_record(allocation=allocation, samples=[late, SampleReport(3, 900_000, HOUR + timedelta(minutes=70))])

        meter_events_enqueue(hour_start=HOUR + timedelta(hours=1))

        assert [value for _, value in meter_values()] == [1_000_000, 1_000_000]
        usage_post(allocation_id=allocation.pk)
        assert sum(value for _, value in meter_values()) == -balance(Account.Kind.RENTER_WALLET, postpaid)

    def test_prepaid_renters_and_quiet_hours_send_nothing(self, renter, stranger, unit):
        BillingProfile.objects.create(user=stranger, postpaid=True, stripe_customer_id="cus_sam")
        usage_record(allocation=allocation_make(renter, unit), samples=[SampleReport(1, 3_600_000, HOUR)])

        assert meter_events_enqueue(hour_start=HOUR) == 0

        assert not OutboxMessage.objects.exists()
