"""Renters adding money to their wallet with a Stripe PaymentIntent.

The wallet is credited only when a verified webhook, re-read at Stripe, says the PaymentIntent
succeeded (``topup_credit``); creating a top-up moves no money.
"""

import logging
import uuid

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet

from billing.models import Account, OutboxMessage, TopUp
from billing.outbox import outbox_enqueue, outbox_profile_object, outbox_send
from billing.services import account_for, ledger_post
from billing.stripe_api import PaymentsUnavailable, client
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import DomainError, StateConflict

log = logging.getLogger(__name__)

# In minor units (cents): Stripe's own minimum is 50; above the maximum we would rather talk first.
TOPUP_MIN_MINOR = 500
TOPUP_MAX_MINOR = 1_000_000


class TopUpAmountInvalid(DomainError, ValueError):
    code = "top-up-amount-invalid"
    title = "Invalid top-up amount"


def topups_visible_to(user) -> QuerySet:
    """The only way to read top-ups on a user's behalf: their own."""
    return TopUp.objects.filter(renter=user)


def topup_amount_check(amount_minor) -> int:
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise TopUpAmountInvalid(f"The amount must be a whole number of minor units, not {amount_minor!r}.")
    if not TOPUP_MIN_MINOR <= amount_minor <= TOPUP_MAX_MINOR:
        raise TopUpAmountInvalid(
            f"A top-up is between {TOPUP_MIN_MINOR / 100:.2f} and {TOPUP_MAX_MINOR / 100:.2f} "
            f"{settings.CURRENCY.upper()}."
        )
    return amount_minor


def topup_customer_ensure(*, renter) -> str:
    """The renter's Stripe Customer id, made now (through the outbox) if there is none."""
    payload = {"email": renter.email or None, "metadata": {"renter_id": str(renter.pk)}}
    customer_id = outbox_profile_object(
        user=renter,
        field="stripe_customer_id",
        operation="customers.create",
        payload={k: v for k, v in payload.items() if v},
    )
    if not customer_id:
        raise PaymentsUnavailable("Stripe could not be reached to set up payments; please try again shortly.")
    return customer_id


def topup_create(*, renter, amount_minor: int) -> TopUp:
    """A top-up and its PaymentIntent. Call it outside a transaction: it commits the top-up, then
    asks Stripe for the PaymentIntent at once so the caller usually gets the client secret; if
    Stripe is slow the outbox keeps trying and the top-up stays CREATED until then."""
    amount_minor = topup_amount_check(amount_minor)
    customer_id = topup_customer_ensure(renter=renter)
    topup_id = uuid.uuid4()
    with transaction.atomic():
        message = outbox_enqueue(
            operation="payment_intents.create",
            payload={
                "amount": amount_minor,
                "currency": settings.CURRENCY,
                "customer": customer_id,
                "automatic_payment_methods": {"enabled": True},
                "metadata": {"topup_id": str(topup_id), "renter_id": str(renter.pk)},
            },
            user=renter,
        )
        topup = TopUp.objects.create(
            id=topup_id, renter=renter, amount_minor=amount_minor, currency=settings.CURRENCY, outbox=message
        )
        audit_record("topup.created", topup.id, actor=f"user:{renter.pk}", amount_minor=amount_minor)
    try:
        outbox_send(message.id)
    except Exception:  # the outbox task and sweep send it later; the caller gets a 202
        log.exception("top-up %s: first PaymentIntent send failed", topup.id)
    topup.refresh_from_db()
    return topup


def topup_payment_intent_sent(*, message: OutboxMessage) -> None:
    """Outbox follow-up: Stripe made the PaymentIntent, so the renter can now pay."""
    topup_id = message.payload["metadata"]["topup_id"]
    client_secret = (message.result or {}).get("client_secret") or ""
    TopUp.objects.filter(pk=topup_id).update(payment_intent_id=message.stripe_id, client_secret=client_secret)
    TopUp.objects.filter(pk=topup_id, state=TopUp.State.CREATED).update(state=TopUp.State.AWAITING_PAYMENT)


def topup_payment_intent_cancelled(*, message: OutboxMessage) -> None:
    """Outbox follow-up: an operator cancelled the PaymentIntent before it was made, so the
    top-up can never be paid."""
    for topup in TopUp.objects.filter(outbox=message):
        topup_fail(topup=topup, reason="cancelled before its payment was set up")


def topup_settle(*, topup: TopUp, payment_intent: dict, payment_failed: bool = False) -> TopUp:
    """Follow what Stripe says of the top-up's PaymentIntent: credited once it succeeded, failed
    once it was canceled, or when ``payment_failed`` (a failed attempt, not the PaymentIntent
    still waiting for its first payment method, which looks the same)."""
    status = payment_intent["status"]
    if status == "succeeded":
        return topup_credit(topup=topup, payment_intent=payment_intent)
    if status == "canceled":
        return topup_fail(topup=topup, reason="canceled")
    if payment_failed and status == "requires_payment_method":
        error = payment_intent.get("last_payment_error") or {}
        return topup_fail(topup=topup, reason=error.get("code") or "payment_failed")
    return topup


def topup_refresh(*, topup: TopUp, actor: str) -> TopUp:
    """An operator's look at Stripe for one top-up, as a webhook would have brought it: a
    PaymentIntent not made yet is sent again through the outbox; one made is re-read and
    followed (``topup_settle``), so a lost webhook costs no credit and a repeat credits nothing."""
    if topup.state == TopUp.State.SUCCEEDED:
        raise StateConflict("The top-up was credited already: there is nothing to refresh.")
    if not topup.payment_intent_id:
        if topup.outbox_id is None:
            raise StateConflict("The top-up has no PaymentIntent and no outbox row to make one.")
        outbox_send(topup.outbox_id)
        topup.refresh_from_db()
        audit_record("topup.refreshed", topup.id, actor=actor, payment_intent=topup.payment_intent_id, status="")
        return topup
    payment_intent = client().v1.payment_intents.retrieve(topup.payment_intent_id).to_dict()
    topup = topup_settle(
        topup=topup, payment_intent=payment_intent, payment_failed=bool(payment_intent.get("last_payment_error"))
    )
    audit_record(
        "topup.refreshed",
        topup.id,
        actor=actor,
        payment_intent=topup.payment_intent_id,
        status=payment_intent["status"],
    )
    return topup


@transaction.atomic
def topup_credit(*, topup: TopUp, payment_intent: dict) -> TopUp:
    """Credit the wallet for a PaymentIntent Stripe says succeeded; once, however often asked.
    A top-up marked FAILED is still credited: a declined card can be retried and then pay."""
    # Locked so that two events for one PaymentIntent processed at once credit it once; the
    # ledger key is the guarantee, the lock keeps the top-up row consistent with it.
    topup = TopUp.objects.select_for_update().get(pk=topup.pk)
    if topup.credited_id is not None:
        return topup
    if payment_intent["amount_received"] != topup.amount_minor or payment_intent["currency"] != topup.currency:
        log.error("top-up %s: PaymentIntent %s does not match it; not credited", topup.id, payment_intent["id"])
        audit_record("topup.mismatch", topup.id, payment_intent=payment_intent["id"])
        return topup
    micros = topup.amount_minor * settings.MICROS_PER_MINOR
    txn = ledger_post(
        key=f"topup:{topup.id}",
        kind="top_up",
        legs=[
            (account_for(Account.Kind.RENTER_WALLET, topup.renter), micros),
            (account_for(Account.Kind.STRIPE_CLEARING), -micros),
        ],
        memo=f"top-up {topup.id} by PaymentIntent {payment_intent['id']}",
    )
    topup.credited = txn
    topup.state = TopUp.State.SUCCEEDED
    topup.payment_intent_id = topup.payment_intent_id or payment_intent["id"]
    topup.save(update_fields=["credited", "state", "payment_intent_id"])
    audit_record("topup.succeeded", topup.id, payment_intent=payment_intent["id"], amount_micros=micros)
    return topup


@transaction.atomic
def topup_fail(*, topup: TopUp, reason: str) -> TopUp:
    """The payment failed or was canceled; a top-up that already succeeded stays succeeded."""
    changed = (
        TopUp.objects.filter(pk=topup.pk)
        .exclude(state__in=[TopUp.State.SUCCEEDED, TopUp.State.FAILED])
        .update(state=TopUp.State.FAILED)
    )
    if changed:
        audit_record("topup.failed", topup.id, reason=reason)
    topup.refresh_from_db()
    return topup
