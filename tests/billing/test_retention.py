"""Settled outbox rows and processed webhook events go after their period; pending work, money
the code reads back and events that may still be redelivered stay."""

from datetime import timedelta

import pytest
from django.utils import timezone

from billing import retention, tasks
from billing.models import OutboxMessage, TopUp, WebhookEvent
from marketplace.kernel.metrics import RETENTION_LAST_RUN, RETENTION_ROWS

pytestmark = pytest.mark.django_db

NOW = timezone.now()
OLD = NOW - timedelta(days=200)


def outbox(name: str, *, operation: str = "customers.create", state: str = "sent", at=OLD, **extra) -> OutboxMessage:
    return OutboxMessage.objects.create(
        operation=operation, payload={"name": name}, state=state, created_at=at, **extra
    )


def event(name: str, *, at=OLD, processed: bool = True, failed: bool = False) -> WebhookEvent:
    return WebhookEvent.objects.create(
        event_id=f"evt_{name}", type="charge.refunded", payload={}, received_at=at,
        processed_at=at if processed else None, failed_at=at if failed else None,
    )  # fmt: skip


def names(rows) -> set[str]:
    return {row.payload.get("name") or row.event_id for row in rows}


def test_settled_outbox_rows_past_their_period_go_and_the_rest_stay(renter):
    outbox("sent")
    outbox("failed", state="failed")
    outbox("pending", state="pending")
    outbox("recent", at=NOW - timedelta(days=5))
    outbox("meter event", operation="billing.meter_events.create")
    outbox("transfer", operation="transfers.create")
    outbox("reversal", operation="transfers.create_reversal")
    TopUp.objects.create(renter=renter, amount_minor=500, outbox=outbox("top-up", operation="payment_intents.create"))

    assert retention.outbox_messages_prune(now=NOW) == 2
    assert names(OutboxMessage.objects.all()) == {
        "pending", "recent", "meter event", "transfer", "reversal", "top-up",
    }  # fmt: skip


def test_processed_webhook_events_past_their_period_go(settings):
    event("processed")
    event("unprocessed", processed=False)
    event("given up", processed=False, failed=True)
    event("recent", at=NOW - timedelta(days=10))

    assert retention.webhook_events_prune(now=NOW) == 1
    assert names(WebhookEvent.objects.all()) == {"evt_unprocessed", "evt_given up", "evt_recent"}


def test_webhook_events_stay_at_least_the_floor_whatever_the_setting(settings):
    """Stripe redelivers for three days: an event deleted sooner would be processed twice."""
    settings.RETENTION_WEBHOOK_DAYS = 1
    event("four days old", at=NOW - timedelta(days=4))

    assert retention.webhook_events_prune(now=NOW) == 0


def test_the_tasks_count_what_they_pruned():
    outbox("sent")
    event("processed")
    counted = RETENTION_ROWS.labels(table=OutboxMessage._meta.db_table, action="pruned")
    before = counted._value.get()

    assert tasks.outbox_messages_prune() == 1
    assert tasks.webhook_events_prune() == 1
    assert counted._value.get() == before + 1
    assert RETENTION_LAST_RUN.labels(task="webhook_events_prune")._value.get() > 0
