import logging
import time
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from billing import meters, services, wallet
from billing.models import RatingClock
from marketplace.jobs.models import Allocation
from marketplace.kernel import metrics

log = logging.getLogger(__name__)
# The daily reconciliation looks back this far (two days, so a missed run leaves no gap).
RECONCILE_WINDOW = timedelta(days=2)


@shared_task(acks_late=True)
def usage_post(allocation_id: str) -> None:
    """Idempotent: posting charges only what is not yet charged. Then the renter's running
    jobs are stopped if the wallet no longer covers stopping them."""
    renter_id = Allocation.objects.filter(pk=allocation_id).values_list("job__renter_id", flat=True).first()
    if renter_id is not None:
        services.usage_post(allocation_id=allocation_id)
        wallet.wallet_guard(renter_id=renter_id)


@shared_task
def usage_rate_sweep() -> None:
    """Post the usage that arrived since the last sweep that succeeded (and a few intervals
    before it, for samples whose transactions committed late), so a late, missed or failed
    sweep loses nothing; then check the wallets of the renters charged."""
    now = timezone.now()
    overlap = timedelta(seconds=3 * settings.USAGE_POSTING_INTERVAL_S + 30)
    last = RatingClock.objects.filter(pk=1).values_list("rated_from", flat=True).first()
    since = min(last or now, now) - overlap
    _, renters = services.usage_rate_since(since)
    RatingClock.objects.update_or_create(pk=1, defaults={"rated_from": now})
    for renter_id in renters:
        wallet.wallet_guard(renter_id=renter_id)


@shared_task(acks_late=True)
def outbox_send(message_id: str) -> None:
    """Idempotent: a row already sent or failed is left alone, and the key makes a resend safe."""
    from billing import outbox

    outbox.outbox_send(message_id)


@shared_task
def outbox_sweep() -> None:
    """Send outbox rows that are due (new or backing off), and retry webhook events that could
    not be processed yet, both oldest first and in bounded batches."""
    from billing import outbox, webhooks

    outbox.outbox_sweep()
    webhooks.webhook_sweep()


@shared_task(bind=True, acks_late=True, max_retries=5)
def webhook_process(self, event_id: str) -> None:
    """Idempotent: processing re-reads the object at Stripe. A few quick retries cover a webhook
    that beat our own commit; after them the sweep keeps trying."""
    from billing import webhooks

    if not webhooks.webhook_process(event_id=event_id) and self.request.retries < self.max_retries:
        raise self.retry(countdown=5 * 2**self.request.retries)


@shared_task(acks_late=True)
def meter_events_enqueue() -> int:
    """Hourly, a few minutes past the hour: postpaid usage of the hour just ended as meter events,
    and of the two hours before it in case a run was missed. Idempotent per renter and hour."""
    this_hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    return sum(meters.meter_events_enqueue(hour_start=this_hour - timedelta(hours=back)) for back in (3, 2, 1))


@shared_task(acks_late=True)
def payouts_run() -> int:
    """Daily: pay owners what is due. Idempotent per owner and day; returns how many were paid."""
    from billing import payouts

    return len(payouts.payouts_run())


@shared_task
def stripe_reconcile() -> int:
    """The daily look at the ledger, the outbox and Stripe (``manage.py reconcile_stripe``):
    each drift is logged as an error for the operators; returns how many there were."""
    from django.core.exceptions import ImproperlyConfigured

    from billing import reconcile

    try:
        drift = reconcile.reconcile(since=timezone.now() - RECONCILE_WINDOW)
    except ImproperlyConfigured as error:
        log.warning("Stripe reconciliation skipped: %s", error)
        return 0
    for found in drift:
        log.error(found.line())
    log.info("Stripe reconciliation: %d drift(s) over the last %s.", len(drift), RECONCILE_WINDOW)
    metrics.RECONCILE_DRIFT.set(len(drift))
    metrics.RECONCILE_LAST_RUN.set(time.time())
    return len(drift)


@shared_task
def outbox_messages_prune() -> int:
    """Hourly: settled outbox rows past RETENTION_OUTBOX_DAYS go (billing.retention says which)."""
    from billing import retention

    deleted = retention.outbox_messages_prune(budget=retention.Budget(settings.RETENTION_RUN_BUDGET_S))
    metrics.RETENTION_LAST_RUN.labels(task="outbox_messages_prune").set(time.time())
    return deleted


@shared_task
def webhook_events_prune() -> int:
    """Hourly: processed webhook events past RETENTION_WEBHOOK_DAYS go."""
    from billing import retention

    deleted = retention.webhook_events_prune(budget=retention.Budget(settings.RETENTION_RUN_BUDGET_S))
    metrics.RETENTION_LAST_RUN.labels(task="webhook_events_prune").set(time.time())
    return deleted
