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
from billing.stripe_api import PaymentsUnavailable
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import DomainError

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
