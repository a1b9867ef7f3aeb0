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
from marketplace.kernel.retention import Budget, rows_prune

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
    return rows_prune(old, budget or Budget(None))


def webhook_events_prune(*, now: datetime | None = None, budget: Budget | None = None) -> int:
    """Delete processed webhook events older than RETENTION_WEBHOOK_DAYS; returns how many."""
    days = max(settings.RETENTION_WEBHOOK_DAYS, settings.RETENTION_WEBHOOK_MIN_DAYS)
    cutoff = (now or timezone.now()) - timedelta(days=days)
    old = WebhookEvent.objects.filter(processed_at__isnull=False, received_at__lt=cutoff)
    return rows_prune(old, budget or Budget(None))
