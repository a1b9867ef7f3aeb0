"""The transactional outbox towards Stripe.

A side effect at Stripe is first a row, written in the transaction that makes the change on our
side, and sent afterwards. The request's idempotency key comes from the row id, so a retry after
a timeout replays Stripe's first answer instead of making a second object; Stripe forgets keys
after 24 hours, so a row older than OUTBOX_LOOKUP_AFTER is looked up at Stripe before it is sent
again.
"""

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import stripe
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.models import BillingProfile, LedgerTransaction, OutboxMessage
from billing.stripe_api import PaymentsUnavailable, client, configured
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import StateConflict
from marketplace.kernel.tasks import publish_on_commit

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 2
BACKOFF_CAP_S = 600
SWEEP_BATCH = 100


def _tags(obj: stripe.StripeObject, message: OutboxMessage) -> bool:
    return (obj.to_dict().get("metadata") or {}).get("outbox_id") == str(message.id)


def _lookup_by_listing(service: Callable[[stripe.StripeClient], object], scope: Callable[[dict], dict] | None = None):
    """A lookup that lists the objects made since the row was written and picks the one whose
    metadata names the row (Stripe's list endpoints filter on ``created``, not on metadata)."""

    def lookup(stripe_client: stripe.StripeClient, message: OutboxMessage, options: dict):
        since = int((message.created_at - timedelta(minutes=5)).timestamp())
        params = {"created": {"gte": since}, "limit": 100, **(scope(message.payload) if scope else {})}
        for obj in service(stripe_client).list(params=params, options=options).auto_paging_iter():
            if _tags(obj, message):
                return obj
        return None

    return lookup


def _reversal_create(stripe_client: stripe.StripeClient, payload: dict, options: dict):
    params = {k: v for k, v in payload.items() if k != "transfer"}
    return stripe_client.v1.transfers.reversals.create(payload["transfer"], params=params, options=options)


def _reversal_lookup(stripe_client: stripe.StripeClient, message: OutboxMessage, options: dict):
    reversals = stripe_client.v1.transfers.reversals.list(message.payload["transfer"], params={"limit": 100})
    for obj in reversals.auto_paging_iter():
        if _tags(obj, message):
            return obj
    return None


def _customer_sent(message: OutboxMessage) -> None:
    # Keep the first customer if two were ever made for one user: it is the one in use.
    BillingProfile.objects.filter(user=message.user, stripe_customer_id="").update(stripe_customer_id=message.stripe_id)


def _account_sent(message: OutboxMessage) -> None:
    BillingProfile.objects.filter(user=message.user, stripe_account_id="").update(stripe_account_id=message.stripe_id)


def _payment_intent_sent(message: OutboxMessage) -> None:
    from billing.topups import topup_payment_intent_sent

    topup_payment_intent_sent(message=message)


def _transfer_reversal_sent(message: OutboxMessage) -> None:
    from billing.disputes import transfer_reversal_sent

    transfer_reversal_sent(message=message)


def _transfer_reversal_failed(message: OutboxMessage, error: stripe.StripeError) -> None:
    from billing.disputes import transfer_reversal_refused

    transfer_reversal_refused(message=message, code=getattr(error, "code", None) or "")


def _meter_event_duplicate(error: stripe.InvalidRequestError) -> bool:
    # Stripe refuses a meter event whose identifier it already holds: that event did arrive.
    return "identifier" in str(error.user_message or error).lower() and "already" in str(error).lower()


@dataclass(frozen=True)
class Operation:
    send: Callable[[stripe.StripeClient, dict, dict], object]
    lookup: Callable[[stripe.StripeClient, OutboxMessage, dict], object] | None = None
    tagged: bool = True  # the payload carries metadata.outbox_id
    on_sent: Callable[[OutboxMessage], None] | None = None
    # True when an InvalidRequestError means "already done" rather than "refused".
    already_done: Callable[[stripe.InvalidRequestError], bool] | None = None
    # Called when Stripe refuses the row for good (not for an idempotency conflict, our bug);
    # the error's ``code`` says why (``balance_insufficient``, ...).
    on_failed: Callable[[OutboxMessage, stripe.StripeError], None] | None = None


OPERATIONS: dict[str, Operation] = {
    "customers.create": Operation(
        send=lambda c, p, o: c.v1.customers.create(params=p, options=o),
        lookup=_lookup_by_listing(lambda c: c.v1.customers),
        on_sent=_customer_sent,
    ),
    "payment_intents.create": Operation(
        send=lambda c, p, o: c.v1.payment_intents.create(params=p, options=o),
        lookup=_lookup_by_listing(lambda c: c.v1.payment_intents, lambda p: {"customer": p["customer"]}),
        on_sent=_payment_intent_sent,
    ),
    "transfers.create": Operation(
        send=lambda c, p, o: c.v1.transfers.create(params=p, options=o),
        lookup=_lookup_by_listing(lambda c: c.v1.transfers, lambda p: {"destination": p["destination"]}),
    ),
    "transfers.create_reversal": Operation(
        send=_reversal_create,
        lookup=_reversal_lookup,
        on_sent=_transfer_reversal_sent,
        on_failed=_transfer_reversal_failed,
    ),
    "refunds.create": Operation(
        send=lambda c, p, o: c.v1.refunds.create(params=p, options=o),
        lookup=_lookup_by_listing(lambda c: c.v1.refunds),
    ),
    "accounts.create": Operation(
        send=lambda c, p, o: c.v1.accounts.create(params=p, options=o),
        lookup=_lookup_by_listing(lambda c: c.v1.accounts),
        on_sent=_account_sent,
    ),
    # An onboarding link is short-lived and carries no metadata: making a fresh one is harmless.
    "account_links.create": Operation(
        send=lambda c, p, o: c.v1.account_links.create(params=p, options=o), tagged=False
    ),
    # Meter events cannot be listed; their deterministic identifier is what dedupes them.
    "billing.meter_events.create": Operation(
        send=lambda c, p, o: c.v1.billing.meter_events.create(params=p, options=o),
        tagged=False,
        already_done=_meter_event_duplicate,
    ),
}


def outbox_enqueue(
    *, operation: str, payload: dict, user=None, ledger_transaction=None, stripe_account: str = ""
) -> OutboxMessage:
    """Write one Stripe side effect; call it inside the transaction whose change it belongs to.
    It is sent once that transaction commits (and retried by the sweep until Stripe answers)."""
    if operation not in OPERATIONS:
        raise ValueError(f"Unknown outbox operation {operation!r}.")
    message_id = uuid.uuid4()
    payload = dict(payload)
    if OPERATIONS[operation].tagged:
        payload["metadata"] = {**payload.get("metadata", {}), "outbox_id": str(message_id)}
    elif operation == "billing.meter_events.create":
        payload.setdefault("identifier", str(message_id))
    message = OutboxMessage.objects.create(
        id=message_id,
        operation=operation,
        payload=payload,
        user=user,
        ledger_transaction=ledger_transaction,
        stripe_account=stripe_account,
    )
    from billing import tasks

    publish_on_commit(tasks.outbox_send, str(message_id))
    return message


def _retry_after_s(error: stripe.StripeError) -> float:
    for name, value in (error.headers or {}).items():
        if name.lower() == "retry-after":
            try:
                return float(value)
            except (TypeError, ValueError):
                return 0.0
    return 0.0


def outbox_backoff(attempts: int, retry_after_s: float = 0.0) -> timedelta:
    """Exponential with full jitter in its upper half, capped; never sooner than Retry-After."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(attempts - 1, 0))
    return timedelta(seconds=max(random.uniform(ceiling / 2, ceiling), retry_after_s))


def _retryable(error: stripe.StripeError) -> bool:
    # A missing or revoked API key is fixed by a person; the rows wait for it instead of failing.
    if isinstance(error, stripe.RateLimitError | stripe.APIConnectionError | stripe.AuthenticationError):
        return True
    # 409: a request with this key is still in flight at Stripe. 5xx: Stripe's trouble.
    status = error.http_status
    return isinstance(error, stripe.APIError) and (status is None or status >= 500 or status == 409)


def _defer(message: OutboxMessage, error: stripe.StripeError) -> None:
    message.attempts += 1
    message.next_attempt_at = timezone.now() + outbox_backoff(message.attempts, _retry_after_s(error))
    message.last_error = f"{type(error).__name__}: {error}"[:2000]
    message.save(update_fields=["attempts", "next_attempt_at", "last_error"])
    log.warning("outbox %s %s deferred after attempt %d: %s", message.operation, message.id, message.attempts, error)


def _fail(message: OutboxMessage, error: Exception, *, bug: bool = False) -> None:
    message.attempts += 1
    message.state = OutboxMessage.State.FAILED
    message.last_error = f"{type(error).__name__}: {error}"[:2000]
    message.save(update_fields=["attempts", "state", "last_error"])
    if bug:
        # A key reused with other parameters means our payload changed after it was frozen:
        # a defect in our code, never a condition to retry through.
        log.error(
            "outbox %s %s: idempotency key reused with changed parameters: %s", message.operation, message.id, error
        )
    else:
        log.error("outbox %s %s refused by Stripe: %s", message.operation, message.id, error)
    audit_record(
        "outbox.idempotency_conflict" if bug else "outbox.failed",
        message.id,
        operation=message.operation,
        error=message.last_error,
    )
    operation = OPERATIONS.get(message.operation)
    if not bug and operation is not None and operation.on_failed is not None:
        operation.on_failed(message, error)


def _sent(message: OutboxMessage, obj, operation: Operation) -> None:
    result = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    message.attempts += 1
    message.state = OutboxMessage.State.SENT
    message.stripe_id = str(result.get("id") or result.get("identifier") or "")[:64]
    message.result = result
    message.sent_at = timezone.now()
    message.last_error = ""
    message.save(update_fields=["attempts", "state", "stripe_id", "result", "sent_at", "last_error"])
    if operation.on_sent is not None:
        operation.on_sent(message)


def outbox_profile_object(*, user, field: str, operation: str, payload: dict) -> str:
    """The Stripe id kept in ``field`` of the user's BillingProfile (a Customer, a Connect
    account), made now through the outbox if there is none. One pending row per user and
    operation, written under the profile's row lock so that two first requests at once make one
    object, and sent at once. Empty when Stripe could not be reached (the sweep keeps trying);
    PaymentsUnavailable when no Stripe account is configured at all (nothing is queued then)."""
    if not configured():
        raise PaymentsUnavailable("Payments are not set up on this marketplace: it has no Stripe account.")
    with transaction.atomic():
        profile, _ = BillingProfile.objects.get_or_create(user=user)
        profile = BillingProfile.objects.select_for_update().get(pk=profile.pk)
        if getattr(profile, field):
            return getattr(profile, field)
        pending = OutboxMessage.objects.filter(user=user, operation=operation, state=OutboxMessage.State.PENDING)
        message = pending.first() or outbox_enqueue(operation=operation, payload=payload, user=user)
    outbox_send(message.id)
    return getattr(BillingProfile.objects.get(user=user), field)


def outbox_send(message_id) -> OutboxMessage:
    """Send one row to Stripe if it is still pending; safe to call any number of times."""
    with transaction.atomic():
        # The row lock keeps two senders (the on-commit task, the sweep, a synchronous try) from
        # calling Stripe with one key at once, and it is held across the call on purpose: the
        # answer and the state change commit together or not at all.
        message = OutboxMessage.objects.select_for_update().get(pk=message_id)
        if message.state != OutboxMessage.State.PENDING:
            return message
        operation = OPERATIONS[message.operation]
        options = {"idempotency_key": message.idempotency_key}
        if message.stripe_account:
            options["stripe_account"] = message.stripe_account
        stripe_client = client()
        try:
            obj = None
            if operation.lookup is not None and timezone.now() - message.created_at > settings.OUTBOX_LOOKUP_AFTER:
                lookup_options = {"stripe_account": message.stripe_account} if message.stripe_account else {}
                obj = operation.lookup(stripe_client, message, lookup_options)
            if obj is None:
                obj = operation.send(stripe_client, message.payload, options)
        except stripe.IdempotencyError as error:
            _fail(message, error, bug=True)
        except stripe.InvalidRequestError as error:
            if operation.already_done is not None and operation.already_done(error):
                _sent(message, {"identifier": message.payload.get("identifier", "")}, operation)
            else:
                _fail(message, error)
        except stripe.StripeError as error:
            if _retryable(error):
                _defer(message, error)
            else:
                _fail(message, error)
        else:
            _sent(message, obj, operation)
        return message


def outbox_due(limit: int = SWEEP_BATCH) -> list:
    """Ids of pending rows whose time has come, oldest first."""
    rows = OutboxMessage.objects.filter(state=OutboxMessage.State.PENDING, next_attempt_at__lte=timezone.now())
    return list(rows.order_by("created_at").values_list("id", flat=True)[:limit])


def outbox_sweep(limit: int = SWEEP_BATCH) -> int:
    """Send what is due, oldest first, at most ``limit`` rows; returns how many were tried."""
    due = outbox_due(limit)
    for message_id in due:
        try:
            outbox_send(message_id)
        except Exception:  # one broken row must not stop the rest of the sweep
            log.exception("outbox %s could not be sent", message_id)
    return len(due)


# What an operator may cancel before it is sent: the rows that move no money. A transfer, a
# transfer reversal or a refund is money at Stripe, and an unsent row may still have been applied
# there (a timeout after Stripe acted): cancelling it would leave our ledger and Stripe apart. A
# meter event is the renter's bill, and each later event reports only what earlier rows did not,
# so a cancelled one would be usage never billed.
CANCELLABLE = frozenset({"customers.create", "accounts.create", "account_links.create", "payment_intents.create"})


def _payout_reversed(message: OutboxMessage) -> bool:
    from billing.payouts import PAYOUT, PAYOUT_REVERSAL

    txn = message.ledger_transaction
    if message.operation != "transfers.create" or txn is None or txn.kind != PAYOUT:
        return False
    return LedgerTransaction.objects.filter(key=f"{PAYOUT_REVERSAL}:{txn.key}").exists()


def _locked(message_id) -> OutboxMessage:
    # The lock outbox_send holds across its call to Stripe: an operator's change waits for a send
    # in flight and then sees what it did. The payout run takes it too before reversing a payout.
    return OutboxMessage.objects.select_for_update(of=("self",)).select_related("ledger_transaction").get(pk=message_id)


@transaction.atomic
def outbox_retry(*, message_id, actor: str) -> OutboxMessage:
    """Send a row again, now: a failed one once a person has fixed its cause, or one backing off;
    the send is published on commit. A row Stripe refused gets a fresh idempotency key, since
    Stripe would answer the old one with the same refusal for a day; a refusal made nothing, so
    the new key cannot make a second object. A row failed for an idempotency conflict keeps its
    key: the request behind it may have been applied. Refused for a row sent or cancelled, and for
    a payout whose refused transfer was reversed since: the owner is owed that money again and
    the next payout pays it, so the old transfer would pay them twice."""
    message = _locked(message_id)
    if message.state not in (OutboxMessage.State.PENDING, OutboxMessage.State.FAILED):
        raise StateConflict(f"The message is {message.state}: there is nothing to send again.")
    if _payout_reversed(message):
        raise StateConflict("The payout of this transfer was reversed (the owner is owed it again): not sent twice.")
    previous = message.state
    refused = previous == OutboxMessage.State.FAILED and not message.last_error.startswith("IdempotencyError")
    message.resends += refused
    message.state, message.next_attempt_at = OutboxMessage.State.PENDING, timezone.now()
    message.save(update_fields=["state", "next_attempt_at", "resends"])
    audit_record(
        "outbox.retried", message.id, actor=actor, operation=message.operation, previous=previous,
        attempts=message.attempts, idempotency_key=message.idempotency_key,
    )  # fmt: skip
    from billing import tasks

    publish_on_commit(tasks.outbox_send, str(message.id))
    return message


@transaction.atomic
def outbox_cancel(*, message_id, actor: str) -> OutboxMessage:
    """Give up a row that was never sent and moves no money (``CANCELLABLE``); a top-up waiting
    for its PaymentIntent fails with it. Anything else is refused."""
    message = _locked(message_id)
    if message.state not in (OutboxMessage.State.PENDING, OutboxMessage.State.FAILED):
        raise StateConflict(f"The message is {message.state}: only one not sent can be cancelled.")
    if message.operation not in CANCELLABLE:
        raise StateConflict(
            f"A {message.operation} row is never cancelled: it moves money or bills usage, and may have reached "
            "Stripe already. Retry it, or settle it at Stripe and in the ledger."
        )
    previous = message.state
    message.state = OutboxMessage.State.CANCELLED
    message.save(update_fields=["state"])
    audit_record("outbox.cancelled", message.id, actor=actor, operation=message.operation, previous=previous)
    if message.operation == "payment_intents.create":
        from billing.topups import topup_payment_intent_cancelled

        topup_payment_intent_cancelled(message=message)
    return message
