"""Owners getting paid: a Connect Express account per owner, and a daily transfer of what they
are owed, less a reserve.

A payout is one ledger posting (owner payable -> Stripe clearing) and one ``transfers.create``
outbox row, written in one transaction. Stripe refusing the transfer (``balance_insufficient``
above all) leaves the row FAILED; the next run posts the reverse of that payout, so the money is
owed again, and pays it anew.
"""

import logging
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Sum, Value
from django.db.models.functions import Concat
from django.utils import timezone

from billing.models import Account, BillingProfile, LedgerEntry, LedgerTransaction, OutboxMessage
from billing.outbox import outbox_enqueue, outbox_profile_object
from billing.selectors import owner_payable_micros
from billing.services import account_for, ledger_post
from billing.stripe_api import PaymentsUnavailable, client
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import StateConflict

log = logging.getLogger(__name__)

PAYOUT = "payout"
PAYOUT_REVERSAL = "payout_reversal"


def connect_account_ensure(*, owner) -> str:
    """The owner's Connect account id, made now (through the outbox) if there is none."""
    payload = {
        "type": "express",
        "capabilities": {"transfers": {"requested": True}},
        "metadata": {"owner_id": str(owner.pk)},
    }
    if owner.email:
        payload["email"] = owner.email
    account_id = outbox_profile_object(
        user=owner, field="stripe_account_id", operation="accounts.create", payload=payload
    )
    if not account_id:
        raise PaymentsUnavailable("Stripe could not be reached to set up payouts; please try again shortly.")
    return account_id


def connect_onboarding_link(*, owner, return_url: str, refresh_url: str) -> str:
    """A fresh Stripe-hosted onboarding URL for the owner's Express account. An account link
    moves no money and expires in minutes, so it is asked for directly, not through the outbox."""
    account_id = connect_account_ensure(owner=owner)
    link = client().v1.account_links.create(
        params={
            "account": account_id,
            "type": "account_onboarding",
            "return_url": return_url,
            "refresh_url": refresh_url,
        }
    )
    return link.url


def connect_account_sync(*, account_id: str) -> int:
    """Copy the Connect account's standing as Stripe says it now (``account.updated`` and the
    operators' "sync" both come here); returns how many profiles name the account."""
    account = client().v1.accounts.retrieve(account_id).to_dict()
    requirements = account.get("requirements") or {}
    due = list(dict.fromkeys((requirements.get("past_due") or []) + (requirements.get("currently_due") or [])))
    return BillingProfile.objects.filter(stripe_account_id=account["id"]).update(
        payouts_enabled=bool(account.get("payouts_enabled")),
        details_submitted=bool(account.get("details_submitted")),
        requirements_due=due,
        disabled_reason=(requirements.get("disabled_reason") or "")[:80],
    )


def billing_profile_sync(*, profile: BillingProfile, actor: str) -> BillingProfile:
    """An operator's re-read of an owner's Connect account, for an ``account.updated`` webhook
    that never came; a renter's Customer holds nothing of ours to refresh."""
    if not profile.stripe_account_id:
        raise StateConflict("The profile has no Connect account: there is nothing at Stripe to sync from.")
    connect_account_sync(account_id=profile.stripe_account_id)
    profile.refresh_from_db()
    audit_record(
        "billing_profile.synced", profile.user.public_id, actor=actor, account=profile.stripe_account_id,
        payouts_enabled=profile.payouts_enabled,
    )  # fmt: skip
    return profile


def payout_amount_micros(*, owner, now: datetime) -> int:
    """What may be paid out now, in micros rounded down to the minor unit: the payable less a
    reserve of PAYOUT_RESERVE_PERCENT of it (rounded up) and less all earned in the hold window."""
    payable = owner_payable_micros(owner)
    held = (
        LedgerEntry.objects.filter(
            account__kind=Account.Kind.OWNER_PAYABLE,
            account__user=owner,
            amount_micros__gt=0,
            transaction__created_at__gt=now - timedelta(days=settings.PAYOUT_HOLD_DAYS),
        )
        # Owed again, not newly earned: a refused payout, or an owner's transfer reversed at Stripe.
        .exclude(transaction__kind__in=[PAYOUT_REVERSAL, "transfer_reversal"])
        .aggregate(total=Sum("amount_micros"))["total"]
        or 0
    )
    reserve = -(-payable * settings.PAYOUT_RESERVE_PERCENT // 100) + held
    payable_now = max(payable - reserve, 0)
    return payable_now - payable_now % settings.MICROS_PER_MINOR


def _payout_key(owner_id, period: str) -> str | None:
    """The key of the owner's next payout this period, or None when one stands: the first is
    ``payout:<owner>:<day>``; after each reversed one, a numbered retry."""
    base = f"{PAYOUT}:{owner_id}:{period}"
    made = list(
        LedgerTransaction.objects.filter(kind=PAYOUT, key__in=_candidate_keys(base)).values_list("key", flat=True)
    )
    if not made:
        return base
    reversed_keys = set(
        LedgerTransaction.objects.filter(key__in=[f"{PAYOUT_REVERSAL}:{key}" for key in made]).values_list(
            "key", flat=True
        )
    )
    if any(f"{PAYOUT_REVERSAL}:{key}" not in reversed_keys for key in made):
        return None
    return f"{base}:{len(made) + 1}"


def _candidate_keys(base: str, tries: int = 50) -> list[str]:
    return [base] + [f"{base}:{n}" for n in range(2, tries + 1)]


@transaction.atomic
def payout_create(*, profile: BillingProfile, now: datetime) -> LedgerTransaction | None:
    """Pay one owner for this period, once; None when nothing is due or the period is paid."""
    owner = profile.user
    payable = account_for(Account.Kind.OWNER_PAYABLE, owner)
    # The owner's payable row is the lock that serialises payouts of one owner (two runs at
    # once); usage postings do not take it, and they only ever add to what is owed.
    Account.objects.select_for_update().filter(pk=payable.pk).get()
    key = _payout_key(owner.pk, now.astimezone(UTC).date().isoformat())
    if key is None:
        return None
    micros = payout_amount_micros(owner=owner, now=now)
    if micros < settings.PAYOUT_MINIMUM_MINOR * settings.MICROS_PER_MINOR:
        return None
    txn = ledger_post(
        key=key,
        kind=PAYOUT,
        legs=[(payable, -micros), (account_for(Account.Kind.STRIPE_CLEARING), micros)],
        memo=f"payout to {profile.stripe_account_id}",
    )
    outbox_enqueue(
        operation="transfers.create",
        payload={
            "amount": micros // settings.MICROS_PER_MINOR,
            "currency": settings.CURRENCY,
            "destination": profile.stripe_account_id,
            "transfer_group": f"{PAYOUT}:{txn.key}",
            "metadata": {"ledger_transaction_id": str(txn.pk), "ledger_key": txn.key, "owner_id": str(owner.pk)},
        },
        user=owner,
        ledger_transaction=txn,
        stripe_account="",
    )
    return txn


@transaction.atomic
def payout_reverse(*, message: OutboxMessage) -> LedgerTransaction | None:
    """Owe the owner again what a refused transfer was meant to pay; once per payout."""
    # Re-read under the outbox row's lock: an operator may have sent the row again meanwhile
    # (billing.outbox.outbox_retry), and then no transfer was refused to reverse.
    message = (
        OutboxMessage.objects.select_for_update(of=("self",)).select_related("ledger_transaction").get(pk=message.pk)
    )
    if message.state != OutboxMessage.State.FAILED or message.operation != "transfers.create":
        return None
    txn = message.ledger_transaction
    legs = [(entry.account, -entry.amount_micros) for entry in txn.entries.select_related("account")]
    reversal = ledger_post(
        key=f"{PAYOUT_REVERSAL}:{txn.key}", kind=PAYOUT_REVERSAL, legs=legs, memo=f"transfer refused: {txn.key}"
    )
    audit_record("payout.reversed", txn.pk, key=txn.key, outbox_id=str(message.id))
    return reversal


def payout_failures_reverse() -> list[LedgerTransaction]:
    """Reverse payouts whose transfer Stripe refused. Only a refusal (InvalidRequestError, as
    ``balance_insufficient`` is) proves no transfer was made; an idempotency conflict or other
    failure may hide a transfer that did happen, so it waits for a person."""
    reversal = LedgerTransaction.objects.filter(
        key=Concat(Value(f"{PAYOUT_REVERSAL}:"), OuterRef("ledger_transaction__key"))
    )
    refused = (
        OutboxMessage.objects.filter(
            operation="transfers.create",
            state=OutboxMessage.State.FAILED,
            ledger_transaction__kind=PAYOUT,
            last_error__startswith="InvalidRequestError",
        )
        .exclude(Exists(reversal))
        .select_related("ledger_transaction")
    )
    reversed_ = []
    for message in refused:
        try:
            reversed_.append(payout_reverse(message=message))
        except Exception:  # one broken row must not keep the other owners from being owed again
            log.exception("payout of outbox %s could not be reversed", message.id)
    return reversed_


def payouts_run(*, now: datetime | None = None) -> list[LedgerTransaction]:
    """Pay every owner whose payouts Stripe has enabled; returns the payouts posted. Each owner
    is paid in a transaction of their own, so one owner's trouble never holds up the rest."""
    now = now or timezone.now()
    payout_failures_reverse()
    posted = []
    profiles = BillingProfile.objects.filter(payouts_enabled=True).exclude(stripe_account_id="").select_related("user")
    for profile in profiles.order_by("user_id"):
        try:
            txn = payout_create(profile=profile, now=now)
        except Exception:
            log.exception("payout for owner %s failed", profile.user_id)
            continue
        if txn is not None:
            posted.append(txn)
    return posted
