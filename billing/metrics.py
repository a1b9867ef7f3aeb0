"""Money's backlogs as Prometheus reads them at scrape time (``/metrics``): Stripe calls waiting
in the outbox or given up, and webhook events not yet processed or given up."""

from django.db.models import Count, Min, Q
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from billing.models import OutboxMessage, WebhookEvent


def collect():
    now = timezone.now()
    outbox = GaugeMetricFamily(
        "shedshare_outbox_messages", "Stripe calls in the outbox, pending or failed (needing a person).",
        labels=["state"],
    )
    rows = dict(
        OutboxMessage.objects.filter(state__in=[OutboxMessage.State.PENDING, OutboxMessage.State.FAILED])
        .values_list("state")
        .annotate(n=Count("pk"))
    )
    for state in (OutboxMessage.State.PENDING, OutboxMessage.State.FAILED):
        outbox.add_metric([state], rows.get(state, 0))
    yield outbox
    oldest = OutboxMessage.objects.filter(state=OutboxMessage.State.PENDING).aggregate(at=Min("created_at"))["at"]
    yield GaugeMetricFamily(
        "shedshare_outbox_oldest_pending_age_seconds", "Age of the oldest pending Stripe call.",
        value=(now - oldest).total_seconds() if oldest else 0,
    )

    waiting = Q(processed_at__isnull=True, failed_at__isnull=True)
    counts = WebhookEvent.objects.aggregate(
        backlog=Count("pk", filter=waiting),
        failed=Count("pk", filter=Q(processed_at__isnull=True, failed_at__isnull=False)),
        oldest=Min("received_at", filter=waiting),
    )
    webhooks = GaugeMetricFamily(
        "shedshare_webhook_events", "Stripe events not processed: waiting, or given up (needing a person).",
        labels=["state"],
    )
    webhooks.add_metric(["waiting"], counts["backlog"])
    webhooks.add_metric(["failed"], counts["failed"])
    yield webhooks
    yield GaugeMetricFamily(
        "shedshare_webhook_oldest_waiting_age_seconds", "Age of the oldest Stripe event waiting to be processed.",
        value=(now - counts["oldest"]).total_seconds() if counts["oldest"] else 0,
    )
