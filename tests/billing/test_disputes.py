"""Refunds and disputes of a renter's top-up reverse the wallet, then the owners' earnings."""

import json
from datetime import timedelta

import pytest
from django.conf import settings
from django.db.models import Count, Sum
from django.utils import timezone

from billing.models import Account, LedgerEntry, LedgerTransaction, OutboxMessage
from billing.outbox import outbox_send
from billing.payouts import payouts_run
from billing.selectors import owner_payable_micros, wallet_balance_micros
from billing.services import account_balance, account_for, ledger_post
from billing.stripe_api import client as stripe_client
from billing.topups import topup_create
from billing.webhooks import webhook_process
from tests.billing.test_payouts import onboarded
from tests.conftest import ledger_backdate, user_make
from tests.stripe_fake import sign

pytestmark = pytest.mark.django_db

NOW = timezone.now()
OLD = NOW - timedelta(days=30)
M = 10_000  # micros per cent, as settings.MICROS_PER_MINOR


def deliver(client, event: dict) -> bool:
    body = json.dumps(event).encode()
    signature = sign(body, settings.STRIPE_WEBHOOK_SECRETS[0])
    response = client.post(
        "/api/stripe/webhook", data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=signature
    )
    assert response.status_code == 200
    return webhook_process(event_id=event["id"])


def paid_topup(client, fake, renter, amount_minor: int = 2500) -> dict:
    """A top-up Stripe charged and we credited; returns its charge."""
    topup = topup_create(renter=renter, amount_minor=amount_minor)
    assert deliver(client, fake.event("payment_intent.succeeded", fake.succeed_payment(topup.payment_intent_id)))
    return fake.get("charge", fake.get("payment_intent", topup.payment_intent_id)["latest_charge"])


def spent(renter, owner, micros: int, *, key: str, at=OLD) -> LedgerTransaction:
    """Usage the renter paid for out of the wallet, as ``usage_post`` posts it (15% fee)."""
    fee = micros * 15 // 100
    txn = ledger_post(
        key=key,
        kind="usage",
        legs=[
            (account_for(Account.Kind.RENTER_WALLET, renter), -micros),
            (account_for(Account.Kind.OWNER_PAYABLE, owner), micros - fee),
            (account_for(Account.Kind.PLATFORM_FEES), fee),
        ],
    )
    ledger_backdate(txn, at)  # outside the payout hold
    return txn


def refund(payment_intent: str, amount_minor: int) -> None:
    stripe_client().v1.refunds.create(params={"payment_intent": payment_intent, "amount": amount_minor})


def kinds() -> dict[str, int]:
    return dict(LedgerTransaction.objects.values_list("kind").annotate(n=Count("id")))


def assert_balanced() -> None:
    unbalanced = LedgerEntry.objects.values("transaction").annotate(t=Sum("amount_micros")).exclude(t=0)
    assert list(unbalanced) == []
    totals = [account_balance(a) for a in Account.objects.all()]
    assert {a.kind for a in Account.objects.all()} <= set(Account.Kind)
    assert sum(totals) == 0


@pytest.fixture
def paid_owner(client, owner, renter, stripe_fake):
    """The renter topped up 25.00, spent 20.00 on the owner's unit, and the owner was paid."""
    charge = paid_topup(client, stripe_fake, renter)
    spent(renter, owner, 20_000_000, key="use-1")
    account_id = onboarded(owner, stripe_fake)
    [payout] = payouts_run(now=NOW)
    assert outbox_send(OutboxMessage.objects.get(ledger_transaction=payout).id).state == OutboxMessage.State.SENT
    # Payable 17.00 less the 10% reserve: 15.30 paid, 1.70 still owed.
    assert owner_payable_micros(owner) == 170 * M
    return charge, account_id


def reversal_message() -> OutboxMessage:
    return OutboxMessage.objects.get(operation="transfers.create_reversal")


class TestRefund:
    def test_a_refund_of_an_unspent_top_up_takes_it_from_the_wallet_only(self, client, renter, stripe_fake):
        charge = paid_topup(client, stripe_fake, renter)
        refund(charge["payment_intent"], 2500)

        assert deliver(client, stripe_fake.event("charge.refunded", stripe_fake.get("charge", charge["id"])))

        assert wallet_balance_micros(renter) == 0
        assert account_balance(account_for(Account.Kind.STRIPE_CLEARING)) == 0
        assert kinds() == {"top_up": 1, "renter_money_returned": 1}
        assert_balanced()

    def test_partial_refunds_delivered_twice_and_out_of_order_post_the_increase_once(self, client, renter, stripe_fake):
        charge = paid_topup(client, stripe_fake, renter)
        refund(charge["payment_intent"], 1000)
        first = stripe_fake.event("charge.refunded", stripe_fake.get("charge", charge["id"]))
        refund(charge["payment_intent"], 500)
        second = stripe_fake.event("charge.refunded", stripe_fake.get("charge", charge["id"]))

        for event in (second, first, second, first):
            assert deliver(client, event)

        assert wallet_balance_micros(renter) == 1000 * M
        assert kinds()["renter_money_returned"] == 1
        refund(charge["payment_intent"], 200)
        assert deliver(client, stripe_fake.event("charge.refunded", stripe_fake.get("charge", charge["id"])))
        assert wallet_balance_micros(renter) == 800 * M
        assert_balanced()

    def test_a_partly_spent_refund_takes_the_rest_from_the_owner_and_fee(self, client, owner, renter, stripe_fake):
        charge = paid_topup(client, stripe_fake, renter)
        spent(renter, owner, 20_000_000, key="use-1")
        refund(charge["payment_intent"], 1000)

        assert deliver(client, stripe_fake.event("charge.refunded", stripe_fake.get("charge", charge["id"])))

        # 5.00 was still in the wallet; the other 5.00 comes back 85/15 from owner and fee.
        assert wallet_balance_micros(renter) == 0
        assert owner_payable_micros(owner) == 1700 * M - 425 * M
        assert account_balance(account_for(Account.Kind.PLATFORM_FEES)) == 300 * M - 75 * M
        assert not OutboxMessage.objects.filter(operation="transfers.create_reversal").exists()
        assert_balanced()

    def test_usage_taken_back_once_is_not_taken_back_again(self, client, owner, renter, stripe_fake):
        """Two refunds of money the renter spent with two owners: the second takes back the
        usage the first left, not the same usage twice."""
        other = user_make("oscar-owner")
        first = paid_topup(client, stripe_fake, renter, amount_minor=1000)
        spent(renter, owner, 10_000_000, key="use-old", at=OLD)
        second = paid_topup(client, stripe_fake, renter, amount_minor=1000)
        spent(renter, other, 10_000_000, key="use-new", at=OLD + timedelta(days=1))

        for charge in (first, second):
            refund(charge["payment_intent"], 1000)
            assert deliver(client, stripe_fake.event("charge.refunded", stripe_fake.get("charge", charge["id"])))

        # Each owner gives back the 8.50 they earned: the newest usage first, then the older.
        assert (owner_payable_micros(owner), owner_payable_micros(other)) == (0, 0)
        assert account_balance(account_for(Account.Kind.PLATFORM_FEES)) == 0
        assert "renter_money_loss" not in kinds()
        assert_balanced()


class TestDisputeAfterTheOwnerWasPaid:
    def test_the_payable_goes_negative_and_the_transfer_is_reversed(self, client, owner, renter, paid_owner):
        charge, account_id = paid_owner
        dispute = self._dispute(charge)

        assert deliver(client, self.fake.event("charge.dispute.created", dispute))

        assert wallet_balance_micros(renter) == 0
        assert owner_payable_micros(owner) == 170 * M - 1700 * M
        message = reversal_message()
        assert message.payload["amount"] == 1530
        assert outbox_send(message.id).state == OutboxMessage.State.SENT
        [transfer] = self.fake.objects("transfer")
        assert transfer["amount_reversed"] == 1530
        assert owner_payable_micros(owner) == 0
        assert account_balance(account_for(Account.Kind.PLATFORM_FEES)) == 0
        assert outbox_send(message.id).state == OutboxMessage.State.SENT  # a resend posts nothing more
        assert kinds()["transfer_reversal"] == 1
        assert_balanced()

    def test_a_refused_reversal_leaves_the_payable_negative_until_earnings_cover_it(
        self, client, owner, renter, paid_owner
    ):
        charge, account_id = paid_owner
        self.fake.connected_available[account_id] = 0
        assert deliver(client, self.fake.event("charge.dispute.created", self._dispute(charge)))

        message = outbox_send(reversal_message().id)

        assert message.state == OutboxMessage.State.FAILED
        assert "Insufficient funds" in message.last_error
        assert self.fake.objects("transfer")[0]["amount_reversed"] == 0
        assert owner_payable_micros(owner) == -1530 * M
        assert payouts_run(now=NOW + timedelta(days=1)) == []
        spent(renter, owner, 10_000_000, key="use-2")  # 8.50 earned: still 6.80 short
        assert payouts_run(now=NOW + timedelta(days=2)) == []
        spent(renter, owner, 40_000_000, key="use-3")  # 34.00 more: 27.20 owed
        [payout] = payouts_run(now=NOW + timedelta(days=3))
        assert payout.entries.get(account__kind=Account.Kind.OWNER_PAYABLE).amount_micros == -2448 * M
        assert_balanced()

    def test_duplicate_and_reordered_dispute_events_post_once_and_a_won_dispute_gives_it_back(
        self, client, owner, renter, paid_owner
    ):
        charge, _ = paid_owner
        dispute = self._dispute(charge)
        created = self.fake.event("charge.dispute.created", dispute)
        assert deliver(client, created)
        assert deliver(client, self.fake.event("charge.dispute.created", dispute))  # a second event, same dispute
        assert outbox_send(reversal_message().id).state == OutboxMessage.State.SENT
        before = kinds()
        assert before["renter_money_returned"] == 1 and before["earnings_clawback"] == 1

        self.fake.dispute_close(dispute["id"], "won")
        closed = self.fake.event("charge.dispute.closed", self.fake.get("dispute", dispute["id"]))
        for event in (closed, created, closed):
            assert deliver(client, event)

        assert kinds()["dispute_reinstated"] == 2
        assert wallet_balance_micros(renter) == 500 * M
        # Back to what they earned, less what was paid out and not reversed: 17.00 - 0.
        assert owner_payable_micros(owner) == 1700 * M
        assert account_balance(account_for(Account.Kind.PLATFORM_FEES)) == 300 * M
        assert_balanced()

    def test_a_won_dispute_seen_before_it_opened_nets_to_nothing(self, client, owner, renter, paid_owner):
        charge, _ = paid_owner
        dispute = self._dispute(charge)
        created = self.fake.event("charge.dispute.created", dispute)
        self.fake.dispute_close(dispute["id"], "won")

        assert deliver(client, self.fake.event("charge.dispute.closed", self.fake.get("dispute", dispute["id"])))
        assert deliver(client, created)

        assert wallet_balance_micros(renter) == 500 * M
        assert owner_payable_micros(owner) == 170 * M
        assert kinds()["dispute_reinstated"] == 2
        assert_balanced()

    @pytest.fixture(autouse=True)
    def _fake(self, stripe_fake):
        self.fake = stripe_fake

    def _dispute(self, charge: dict) -> dict:
        return self.fake.dispute(charge["id"])
