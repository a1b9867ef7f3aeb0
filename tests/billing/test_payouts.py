"""Owners are paid what they are owed, less a reserve, once a day, through the outbox."""

from datetime import timedelta

import pytest
from django.db.models import Sum
from django.utils import timezone

from billing.models import Account, BillingProfile, LedgerEntry, LedgerTransaction, OutboxMessage
from billing.outbox import outbox_send
from billing.payouts import connect_account_ensure, connect_onboarding_link, payout_failures_reverse, payouts_run
from billing.selectors import owner_payable_micros
from billing.services import account_balance, account_for, ledger_post
from tests.conftest import ledger_backdate

pytestmark = pytest.mark.django_db

# Noon UTC of yesterday: payouts are keyed by UTC day, and a test that runs late in the evening
# must not see "an hour later" fall on the next day.
NOW = (timezone.now() - timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)
OLD = NOW - timedelta(days=30)
RECENT = NOW - timedelta(days=2)


def earned(owner, renter, micros: int, *, at, key: str) -> LedgerTransaction:
    """The owner credited from the renter's wallet, as a usage posting would, at a given time."""
    txn = ledger_post(
        key=key,
        kind="usage",
        legs=[
            (account_for(Account.Kind.RENTER_WALLET, renter), -micros),
            (account_for(Account.Kind.OWNER_PAYABLE, owner), micros),
        ],
    )
    # Tests only: back-date the posting to place it inside or outside the hold window.
    ledger_backdate(txn, at)
    return txn


def onboarded(owner, fake) -> str:
    account_id = connect_account_ensure(owner=owner)
    fake.account_update(account_id, payouts_enabled=True, details_submitted=True, charges_enabled=True)
    BillingProfile.objects.filter(user=owner).update(payouts_enabled=True)
    return account_id


def transfer_of(txn: LedgerTransaction) -> OutboxMessage:
    return outbox_send(OutboxMessage.objects.get(ledger_transaction=txn, operation="transfers.create").id)


def ledger_total() -> int:
    return LedgerEntry.objects.aggregate(total=Sum("amount_micros"))["total"] or 0


class TestOnboarding:
    def test_makes_one_express_account_and_returns_a_link(self, owner, stripe_fake):
        url = connect_onboarding_link(owner=owner, return_url="https://x.test/r", refresh_url="https://x.test/f")

        [account] = stripe_fake.objects("account")
        assert account["type"] == "express"
        assert account["metadata"]["owner_id"] == str(owner.pk)
        assert BillingProfile.objects.get(user=owner).stripe_account_id == account["id"]
        assert account["id"] in url

    def test_a_second_call_reuses_the_account(self, owner, stripe_fake):
        first = connect_onboarding_link(owner=owner, return_url="https://x.test/r", refresh_url="https://x.test/f")
        second = connect_onboarding_link(owner=owner, return_url="https://x.test/r", refresh_url="https://x.test/f")

        assert len(stripe_fake.objects("account")) == 1
        assert first != second
        assert OutboxMessage.objects.filter(operation="accounts.create").count() == 1


class TestPayout:
    def test_pays_the_payable_less_reserve_and_recent_earnings_rounded_down(self, owner, renter, stripe_fake):
        account_id = onboarded(owner, stripe_fake)
        earned(owner, renter, 50_123_456, at=OLD, key="e1")
        earned(owner, renter, 7_000_000, at=RECENT, key="e2")

        [txn] = payouts_run(now=NOW)
        message = transfer_of(txn)

        # Payable 57,123,456; reserve 10% rounded up (5,712,346) plus the recent 7,000,000 leaves
        # 44,411,110 micros, paid as 4,441 cents; the 1,110 micros left over stay owed.
        [transfer] = stripe_fake.objects("transfer")
        assert message.state == OutboxMessage.State.SENT
        assert transfer["amount"] == 4_441
        assert transfer["destination"] == account_id
        assert transfer["transfer_group"] == f"payout:{txn.key}"
        assert transfer["metadata"]["ledger_transaction_id"] == str(txn.pk)
        assert transfer["metadata"]["ledger_key"] == txn.key
        assert txn.key == f"payout:{owner.pk}:{NOW.date().isoformat()}"
        assert owner_payable_micros(owner) == 57_123_456 - 44_410_000
        assert account_balance(account_for(Account.Kind.STRIPE_CLEARING)) == 44_410_000
        assert ledger_total() == 0

    def test_running_twice_in_a_day_pays_once(self, owner, renter, stripe_fake):
        onboarded(owner, stripe_fake)
        earned(owner, renter, 50_000_000, at=OLD, key="e1")

        [txn] = payouts_run(now=NOW)
        transfer_of(txn)
        assert payouts_run(now=NOW + timedelta(hours=1)) == []

        assert len(stripe_fake.objects("transfer")) == 1
        assert OutboxMessage.objects.filter(operation="transfers.create").count() == 1

    def test_an_owner_without_payouts_enabled_is_not_paid(self, owner, renter, stripe_fake):
        connect_account_ensure(owner=owner)
        earned(owner, renter, 50_000_000, at=OLD, key="e1")

        assert payouts_run(now=NOW) == []
        assert owner_payable_micros(owner) == 50_000_000

    def test_an_amount_under_the_minimum_waits(self, owner, renter, stripe_fake):
        onboarded(owner, stripe_fake)
        earned(owner, renter, 1_000_000, at=OLD, key="e1")  # 90 cents after the reserve

        assert payouts_run(now=NOW) == []

    def test_a_transfer_refused_for_insufficient_balance_is_owed_again_and_retried(self, owner, renter, stripe_fake):
        onboarded(owner, stripe_fake)
        earned(owner, renter, 50_000_000, at=OLD, key="e1")
        stripe_fake.available = 100

        [txn] = payouts_run(now=NOW)
        message = transfer_of(txn)
        assert message.state == OutboxMessage.State.FAILED
        assert "insufficient available funds" in message.last_error

        payout_failures_reverse()
        assert owner_payable_micros(owner) == 50_000_000
        assert stripe_fake.objects("transfer") == []

        stripe_fake.available = 10**9
        [retry] = payouts_run(now=NOW + timedelta(hours=1))
        assert transfer_of(retry).state == OutboxMessage.State.SENT
        assert [t["amount"] for t in stripe_fake.objects("transfer")] == [4_500]
        assert owner_payable_micros(owner) == 5_000_000
        assert ledger_total() == 0
        assert payouts_run(now=NOW + timedelta(hours=2)) == []


class TestViews:
    def test_connect_needs_login(self, client, stripe_fake):
        assert client.get("/portal/payouts/connect/")["Location"].startswith("/accounts/login/")
        assert client.post("/portal/payouts/connect/")["Location"].startswith("/accounts/login/")
        assert client.get("/portal/payouts/return/")["Location"].startswith("/accounts/login/")
        assert stripe_fake.objects("account") == []

    def test_connect_sends_the_owner_to_onboarding_for_their_own_account(self, client, owner, stranger, stripe_fake):
        client.force_login(owner)
        response = client.post("/portal/payouts/connect/")

        account_id = BillingProfile.objects.get(user=owner).stripe_account_id
        assert response.status_code == 302
        assert account_id in response["Location"]

        client.force_login(stranger)
        response = client.post("/portal/payouts/connect/")
        stranger_account = BillingProfile.objects.get(user=stranger).stripe_account_id
        assert stranger_account != account_id
        assert stranger_account in response["Location"]
        assert account_id not in response["Location"]

    def test_a_get_creates_nothing_and_offers_the_button(self, client, owner, stripe_fake):
        """Stripe sends the owner back here with a GET when a link has expired; a GET (from
        another site, say) must not create a Connect account."""
        client.force_login(owner)
        response = client.get("/portal/payouts/connect/")

        assert response.status_code == 200
        assert stripe_fake.objects("account") == []
        assert not BillingProfile.objects.filter(user=owner).exclude(stripe_account_id="").exists()
        page = response.content.decode()
        assert '<form method="post" action="/portal/payouts/connect/">' in page
        assert "csrfmiddlewaretoken" in page

    def test_the_post_needs_the_csrf_token(self, owner, stripe_fake):
        from django.test import Client

        client = Client(enforce_csrf_checks=True)
        client.force_login(owner)

        assert client.post("/portal/payouts/connect/").status_code == 403
        assert stripe_fake.objects("account") == []

    def test_return_shows_only_the_callers_own_state(self, client, owner, stranger, stripe_fake):
        onboarded(owner, stripe_fake)

        client.force_login(owner)
        assert "Payouts are on" in client.get("/portal/payouts/return/").content.decode()

        client.force_login(stranger)
        page = client.get("/portal/payouts/return/").content.decode()
        assert "Payouts are on" not in page
        assert "no payout account yet" in page
