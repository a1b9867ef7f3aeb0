"""reconcile_stripe finds every place where the ledger, the outbox and Stripe disagree."""

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from billing.models import Account, LedgerEntry, LedgerTransaction, OutboxMessage
from billing.payouts import payouts_run
from billing.services import account_for
from billing.stripe_api import client
from billing.tasks import stripe_reconcile
from billing.topups import topup_create, topup_credit
from tests.billing.test_payouts import NOW, OLD, earned, onboarded, transfer_of

pytestmark = pytest.mark.django_db


def reconcile(*args) -> tuple[int, list[str]]:
    out = StringIO()
    try:
        call_command("reconcile_stripe", *args, stdout=out)
        code = 0
    except CommandError as error:
        code = error.returncode
    return code, out.getvalue().strip().splitlines()


def drift_codes(lines: list[str]) -> list[str]:
    return [line.split()[1] for line in lines if line.startswith("DRIFT ")]


@pytest.fixture
def paid_up(owner, renter, stripe_fake):
    """A credited top-up and a payout whose transfer was sent: everything agrees."""
    topup = topup_create(renter=renter, amount_minor=2500)
    topup_credit(topup=topup, payment_intent=stripe_fake.succeed_payment(topup.payment_intent_id))
    onboarded(owner, stripe_fake)
    earned(owner, renter, 50_000_000, at=OLD, key="e1")
    [payout] = payouts_run(now=NOW)
    transfer_of(payout)
    return payout


def test_a_clean_state_has_no_drift(paid_up):
    code, lines = reconcile()
    assert code == 0
    assert lines == [lines[0]] and lines[0].startswith("No drift since")


def test_json_summary_on_a_clean_state(paid_up):
    code, lines = reconcile("--json", "--since", "7")
    assert code == 0
    summary = json.loads(lines[-1])
    assert (summary["drift"], summary["items"]) == (0, [])


def test_a_succeeded_payment_never_credited_is_drift(renter, stripe_fake, paid_up):
    topup = topup_create(renter=renter, amount_minor=1000)
    stripe_fake.succeed_payment(topup.payment_intent_id)

    code, lines = reconcile()

    assert code == 1
    assert lines == [
        f"DRIFT payment_intent.not_credited {topup.payment_intent_id}: succeeded for top-up {topup.id} "
        "(1000 usd) but the wallet was never credited"
    ]


def test_a_credited_top_up_whose_payment_failed_is_drift(renter, stripe_fake, paid_up):
    topup = topup_create(renter=renter, amount_minor=1000)
    stripe_fake.fail_payment(topup.payment_intent_id)
    # As a bug would: credited on a PaymentIntent Stripe never saw succeed.
    claimed = {"id": topup.payment_intent_id, "amount_received": 1000, "currency": "usd"}
    topup_credit(topup=topup, payment_intent=claimed)

    code, lines = reconcile()

    assert code == 1
    assert drift_codes(lines) == ["topup.not_succeeded"]
    assert "requires_payment_method" in lines[0]


def test_a_transfer_of_another_amount_is_drift(stripe_fake, paid_up):
    [transfer] = stripe_fake.objects("transfer")
    # Tests only: change the stored transfer behind the SDK's back.
    stripe_fake._store["transfer"][transfer["id"]]["amount"] = transfer["amount"] - 1

    code, lines = reconcile()

    assert code == 1
    assert drift_codes(lines) == ["payout.amount_mismatch"]
    assert transfer["id"] in lines[0]


def test_a_payout_transfer_with_no_posting_is_drift(owner, stripe_fake, paid_up):
    account_id = stripe_fake.objects("account")[0]["id"]
    stray = client().v1.transfers.create(
        params={"amount": 100, "currency": "usd", "destination": account_id, "transfer_group": "payout:payout:9:x"}
    )

    code, lines = reconcile()

    assert code == 1
    assert lines == [f"DRIFT transfer.no_posting {stray.id}: transfer_group payout:payout:9:x has no payout posting"]


def test_a_stuck_and_a_failed_outbox_row_are_drift(renter, paid_up):
    stuck = OutboxMessage.objects.create(
        operation="customers.create", payload={}, user=renter, created_at=timezone.now() - timedelta(hours=2)
    )
    fresh = OutboxMessage.objects.create(operation="customers.create", payload={}, user=renter)
    failed = OutboxMessage.objects.create(
        operation="customers.create", payload={}, user=renter, state="failed", last_error="InvalidRequestError: no"
    )

    code, lines = reconcile()

    assert code == 1
    assert drift_codes(lines) == ["outbox.stuck", "outbox.failed"]
    assert str(stuck.id) in lines[0] and str(failed.id) in lines[1]
    assert not any(str(fresh.id) in line for line in lines)


def test_an_unbalanced_transaction_is_drift(renter, paid_up):
    txn = LedgerTransaction.objects.create(key="broken", kind="promotion")
    # As only a bypass of ledger_post could: one leg.
    LedgerEntry.objects.create(
        transaction=txn, account=account_for(Account.Kind.RENTER_WALLET, renter), amount_micros=5
    )

    code, lines = reconcile("--json")

    assert code == 1
    assert drift_codes(lines) == ["ledger.unbalanced", "ledger.total_not_zero"]
    assert json.loads(lines[-1])["by_code"] == {"ledger.total_not_zero": 1, "ledger.unbalanced": 1}


def test_every_kind_of_drift_at_once_is_each_reported(renter, stripe_fake, paid_up):
    uncredited = topup_create(renter=renter, amount_minor=1000)
    stripe_fake.succeed_payment(uncredited.payment_intent_id)
    failed = topup_create(renter=renter, amount_minor=1500)
    stripe_fake.fail_payment(failed.payment_intent_id)
    topup_credit(
        topup=failed, payment_intent={"id": failed.payment_intent_id, "amount_received": 1500, "currency": "usd"}
    )
    [transfer] = stripe_fake.objects("transfer")
    stripe_fake._store["transfer"][transfer["id"]]["amount"] += 7
    OutboxMessage.objects.create(
        operation="customers.create", payload={}, user=renter, created_at=timezone.now() - timedelta(hours=3)
    )

    code, lines = reconcile("--json")

    assert code == 1
    assert sorted(drift_codes(lines)) == [
        "outbox.stuck",
        "payment_intent.not_credited",
        "payout.amount_mismatch",
        "topup.not_succeeded",
    ]
    assert json.loads(lines[-1])["drift"] == 4


def test_a_refused_and_reversed_payout_is_settled_not_drift(owner, renter, stripe_fake):
    onboarded(owner, stripe_fake)
    earned(owner, renter, 50_000_000, at=OLD, key="e1")
    stripe_fake.available = 0
    [payout] = payouts_run(now=NOW)
    assert transfer_of(payout).state == OutboxMessage.State.FAILED
    payouts_run(now=NOW + timedelta(minutes=1))  # reverses it; the new payout for today waits

    code, lines = reconcile()

    assert [line for line in lines if "outbox.failed" in line] == []


def test_the_daily_task_logs_each_drift_as_an_error(renter, paid_up, caplog):
    stuck = OutboxMessage.objects.create(
        operation="customers.create", payload={}, user=renter, created_at=timezone.now() - timedelta(hours=2)
    )

    with caplog.at_level("INFO", logger="billing.tasks"):
        assert stripe_reconcile() == 1

    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("DRIFT outbox.stuck") and str(stuck.id) in errors[0]


def test_the_daily_task_without_stripe_configured_skips_with_a_warning(settings, caplog):
    settings.STRIPE_SECRET_KEY = ""

    assert stripe_reconcile() == 0
    assert "Stripe reconciliation skipped" in caplog.text
