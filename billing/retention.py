"""Stripe outbox rows and webhook events kept for a configured period, then deleted in batches.

Outbox rows go RETENTION_OUTBOX_DAYS after they were written, only once settled (sent, or failed
for good: a pending row is work still to do), and only those nothing reads back: meter events
(``billing.meters`` sums them as what was reported to Stripe), transfers and their reversals
(payouts, statements, disputes and reconciliation read them as money sent) and rows a top-up
points at stay for good, as the ledger does.

Webhook events are what makes a redelivered event a duplicate (stored once by event id), so only
processed ones go, RETENTION_WEBHOOK_DAYS after they arrived: settings refuse fewer than
RETENTION_WEBHOOK_MIN_DAYS, well past the three days Stripe retries a delivery for. Failed ones
(given up, "needs a person") stay until someone deals with them.
"""

from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Exists, OuterRef
from django.utils import timezone

from billing.meters import OPERATION as METER_EVENTS
from billing.models import OutboxMessage, TopUp, WebhookEvent
from marketplace.kernel.metrics import RETENTION_ROWS
from marketplace.kernel.retention import Budget

KEPT_OPERATIONS = (METER_EVENTS, "transfers.create", "transfers.create_reversal")
SETTLED = (OutboxMessage.State.SENT, OutboxMessage.State.FAILED)


def outbox_messages_prune(*, now: datetime | None = None, budget: Budget | None = None) -> int:
    """Delete settled outbox rows older than RETENTION_OUTBOX_DAYS (see the module); returns how many."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.RETENTION_OUTBOX_DAYS)
    old = (
        OutboxMessage.objects.filter(state__in=SETTLED, created_at__lt=cutoff)
        .exclude(operation__in=KEPT_OPERATIONS)
        .exclude(Exists(TopUp.objects.filter(outbox=OuterRef("pk"))))
    )
    return _prune(old, OutboxMessage, budget or Budget(None))


def webhook_events_prune(*, now: datetime | None = None, budget: Budget | None = None) -> int:
    """Delete processed webhook events older than RETENTION_WEBHOOK_DAYS; returns how many."""
    days = max(settings.RETENTION_WEBHOOK_DAYS, settings.RETENTION_WEBHOOK_MIN_DAYS)
    cutoff = (now or timezone.now()) - timedelta(days=days)
    old = WebhookEvent.objects.filter(processed_at__isnull=False, received_at__lt=cutoff)
    return _prune(old, WebhookEvent, budget or Budget(None))


def _prune(old, model, budget: Budget) -> int:
    """Delete ``old``'s rows RETENTION_BATCH a statement (each its own transaction), oldest pk first."""
    deleted = 0
    while budget.left():
        ids = list(old.order_by("pk").values_list("pk", flat=True)[: settings.RETENTION_BATCH])
        if not ids:
            break
        count, _ = model.objects.filter(pk__in=ids).delete()
        deleted += count
        RETENTION_ROWS.labels(table=model._meta.db_table, action="pruned").inc(count)
    return deleted
