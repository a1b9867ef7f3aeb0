"""Stripe webhooks: verified on the raw body, stored once per event id, processed afterwards.

Processing never trusts the event's snapshot: it re-reads the object at Stripe and acts on what
Stripe says now, so duplicate and out-of-order deliveries all end in the same state.
"""

import json
import logging
import uuid
from datetime import timedelta

import stripe
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.models import TopUp, WebhookEvent
from billing.payouts import connect_account_sync
from billing.stripe_api import client
from billing.topups import topup_settle
from marketplace.kernel.audit import audit_record
from marketplace.kernel.tasks import publish_on_commit

log = logging.getLogger(__name__)

# An event that still cannot be processed after this many tries needs a person (see last_error).
WEBHOOK_MAX_ATTEMPTS = 20
WEBHOOK_RETRY_AFTER = timedelta(minutes=1)
SWEEP_BATCH = 100


class WebhookRejected(Exception):
    """The request is not a genuine, fresh Stripe event; the endpoint answers 400."""


class NotYet(Exception):
    """The event names something we have not committed yet; try again later."""


class Malformed(Exception):
    """The event lacks what processing needs; no later attempt can change that."""


def event_object_id(event: WebhookEvent) -> str:
    """The id of the object the event is about (``data.object.id``)."""
    data = event.payload.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    object_id = obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(object_id, str) or not object_id:
        raise Malformed("The event has no data.object.id.")
    return object_id


def webhook_verify(*, payload: bytes, signature: str) -> dict:
    """The event in ``payload`` if one of the configured secrets signed it recently enough.
    During a secret rotation Stripe signs with both, and either one verifies."""
    secrets = [s for s in settings.STRIPE_WEBHOOK_SECRETS if s]
    if not secrets:
        raise WebhookRejected("No webhook signing secret is configured.")
    problem = "No Stripe-Signature header."
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, signature, secret, settings.STRIPE_WEBHOOK_TOLERANCE_S)
        except stripe.SignatureVerificationError as error:
            problem = str(error)
        except UnicodeDecodeError:
            raise WebhookRejected("The body is not UTF-8.") from None
        else:
            break
    else:
        raise WebhookRejected(problem)
    try:
        event = json.loads(payload)
    except ValueError:
        raise WebhookRejected("The body is not JSON.") from None
    if not isinstance(event, dict) or not event.get("id") or not event.get("type"):
        raise WebhookRejected("The body is not a Stripe event.")
    return event


def webhook_receive(*, payload: bytes, signature: str) -> tuple[WebhookEvent, bool]:
    """Verify and store one delivery; (event, created). A repeated delivery stores nothing."""
    event = webhook_verify(payload=payload, signature=signature)
    fields = {"type": event["type"][:80], "account": event.get("account") or "", "payload": event}
    try:
        with transaction.atomic():
            stored, created = WebhookEvent.objects.get_or_create(event_id=event["id"], defaults=fields)
    except IntegrityError:  # the same event delivered twice at once: the other request stored it
        return WebhookEvent.objects.get(event_id=event["id"]), False
    if created:
        from billing import tasks

        publish_on_commit(tasks.webhook_process, event["id"])
    return stored, created


def _payment_intent_event(event: WebhookEvent) -> None:
    pi_id = event_object_id(event)
    options = {"stripe_account": event.account} if event.account else {}
    payment_intent = client().v1.payment_intents.retrieve(pi_id, options=options).to_dict()
    topup_id = (payment_intent.get("metadata") or {}).get("topup_id")
    if not topup_id:
        return  # not a top-up: nothing of ours to change
    topup = TopUp.objects.filter(pk=topup_id).first()
    if topup is None:
        # Stripe can tell us about a PaymentIntent before the transaction that wrote the top-up
        # is visible to this worker.
        raise NotYet(f"top-up {topup_id} is not there yet")
    topup_settle(
        topup=topup, payment_intent=payment_intent, payment_failed=event.type == "payment_intent.payment_failed"
    )


def _account_updated(event: WebhookEvent) -> None:
    connect_account_sync(account_id=event.account or event_object_id(event))


def _handler(event_type: str):
    if event_type.startswith("payment_intent."):
        return _payment_intent_event
    if event_type == "account.updated":
        return _account_updated
    if event_type == "charge.refunded" or event_type.startswith("charge.dispute."):
        from billing import disputes

        return disputes.refund_event if event_type == "charge.refunded" else disputes.dispute_event
    return None


def webhook_process(*, event_id: str) -> bool:
    """Act on one stored event; True once it is done with (processed now or before, or failed
    for good), False to try later. Every try that does not process it counts, and after
    WEBHOOK_MAX_ATTEMPTS of them (at once, for a malformed event) it is marked failed."""
    event = WebhookEvent.objects.get(event_id=event_id)
    if event.processed_at is not None or event.failed_at is not None:
        return True
    handler = _handler(event.type)
    try:
        if handler is not None:
            handler(event)
    except Exception as error:
        if not isinstance(error, NotYet | stripe.StripeError | Malformed):
            log.exception("webhook %s %s: processing failed", event.type, event_id)
        return _attempt_failed(event, error, final=isinstance(error, Malformed))
    WebhookEvent.objects.filter(pk=event.pk, processed_at__isnull=True).update(
        processed_at=timezone.now(), attempts=event.attempts + 1, last_error=""
    )
    return True


def _attempt_failed(event: WebhookEvent, error: Exception, *, final: bool) -> bool:
    attempts = event.attempts + 1
    final = final or attempts >= WEBHOOK_MAX_ATTEMPTS
    WebhookEvent.objects.filter(pk=event.pk, processed_at__isnull=True).update(
        attempts=attempts,
        last_error=f"{type(error).__name__}: {error}"[:2000],
        failed_at=timezone.now() if final else None,
    )
    level, outcome = (logging.ERROR, "failed for good") if final else (logging.INFO, "not processed")
    log.log(level, "webhook %s %s %s (attempt %d): %s", event.type, event.event_id, outcome, attempts, error)
    return final


def webhook_sweep(limit: int = SWEEP_BATCH) -> int:
    """Retry events left unprocessed for a minute, oldest first; returns how many were tried."""
    due = WebhookEvent.objects.filter(
        processed_at__isnull=True,
        failed_at__isnull=True,
        received_at__lte=timezone.now() - WEBHOOK_RETRY_AFTER,
    ).order_by("received_at")
    event_ids = list(due.values_list("event_id", flat=True)[:limit])
    for event_id in event_ids:
        try:
            webhook_process(event_id=event_id)
        except Exception:  # one broken event must not stop the rest of the sweep
            log.exception("webhook %s could not be processed", event_id)
    return len(event_ids)


# Audit rows are about UUIDs; a Stripe event's is derived from its id, so one event's replays
# share a subject.
EVENT_SUBJECTS = uuid.UUID("0b6c1f0e-7d4a-4f43-9a52-5c3e8d1f2a67")


def webhook_subject(event_id: str) -> uuid.UUID:
    return uuid.uuid5(EVENT_SUBJECTS, event_id)


def webhook_replay(*, event_id: str, actor: str) -> WebhookEvent:
    """Process a stored event again, now, as the endpoint's task does: one that needs a person
    (once its cause is fixed), one still waiting, or one processed before. Processing re-reads
    Stripe and posts under unique keys, so a replay never credits or takes back anything twice.
    One replay is one attempt: an event past its attempts that fails again needs a person again.
    WebhookEvent.DoesNotExist for an unknown id."""
    event = WebhookEvent.objects.get(event_id=event_id)
    was = "processed" if event.processed_at else "needed a person" if event.failed_at else "waiting"
    WebhookEvent.objects.filter(pk=event.pk).update(processed_at=None, failed_at=None)
    webhook_process(event_id=event_id)
    event.refresh_from_db()
    outcome = "processed" if event.processed_at else "needs a person" if event.failed_at else "waiting"
    audit_record(
        "webhook.replayed", webhook_subject(event_id), actor=actor, event_id=event_id, type=event.type, was=was,
        outcome=outcome, error=event.last_error[:200],
    )  # fmt: skip
    return event
