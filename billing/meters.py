"""Postpaid renters' usage as Stripe Billing Meter events: one aggregated event per renter per hour.

The value is micro-units of the currency, not GPU-seconds, because every allocation has its own
locked price; the Stripe price on the ``gpu_usage`` meter is one micro-unit per unit. Each event
reports (cost of the renter's usage recorded up to the hour's end) - (what earlier events
reported), like ``usage_post`` does for the ledger, so a sample that arrives after its hour was
reported is billed in the next hour's event rather than lost, and nothing is reported twice.
"""

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from django.db import transaction
from django.db.models import BigIntegerField, Min, Sum
from django.db.models.fields.json import KeyTextTransform, KeyTransform
from django.db.models.functions import Cast

from billing.models import BillingProfile, OutboxMessage
from marketplace.jobs.models import UsageHour, UsageSample
from marketplace.jobs.usage import BILLABLE, NOT_ROLLED_UP
from marketplace.kernel.money import usage_cost_micros

EVENT_NAME = "gpu_usage"
OPERATION = "billing.meter_events.create"
# Row ids are derived from the event identifier, so the primary key refuses a second row for the
# same renter and hour, and the outbox's idempotency key (made from the id) is stable as well.
ID_NAMESPACE = uuid.UUID("6f1d3c2e-5a4b-4e0f-9c1d-2b7a8e5f4c30")
# A renter's first event also covers usage this far before its hour: a job that started just before
# the hour ended may report after that hour's run. The hourly task looks back as far, so a
# missed run is caught up. Usage before a renter's first event, beyond this, is the wallet's.
FIRST_LOOKBACK = timedelta(hours=3)


def meter_event_identifier(renter_id, hour_start: datetime) -> str:
    return f"{renter_id}:{hour_start.isoformat()}"


@transaction.atomic
def meter_events_enqueue(*, hour_start: datetime) -> int:
    """Write one pending meter event per postpaid renter whose usage up to the end of the hour
    starting at ``hour_start`` is not yet reported; returns how many rows were written. Running
    it again for the same hour writes nothing."""
    hour_start = hour_start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hour_end = hour_start + timedelta(hours=1)
    # Locked in key order so that two runs (the hourly one and a catch-up) cannot both report
    # the same usage: the second waits and then sees the first one's rows.
    profiles = list(
        BillingProfile.objects.select_for_update()
        .filter(postpaid=True)
        .exclude(stripe_customer_id="")
        .order_by("pk")
        .values_list("user_id", "stripe_customer_id")
    )
    reported = _reported([user_id for user_id, _ in profiles])
    row_ids = {renter: uuid.uuid5(ID_NAMESPACE, meter_event_identifier(renter, hour_start)) for renter, _ in profiles}
    written_before = set(OutboxMessage.objects.filter(pk__in=row_ids.values()).values_list("pk", flat=True))
    written = 0
    for renter_id, customer_id in profiles:
        if row_ids[renter_id] in written_before:
            continue
        first_event = renter_id not in reported
        total, since = reported.get(renter_id, (0, None))
        if first_event:
            since = _first_usage_hour(renter_id, hour_start=hour_start, until=hour_end)
            if since is None:
                continue
        value = _cost_recorded(renter_id, since=since, until=hour_end) - total
        if value <= 0:
            continue
        payload = {
            "event_name": EVENT_NAME,
            "identifier": meter_event_identifier(renter_id, hour_start),
            # A renter's first event is dated from its first usage (see FIRST_LOOKBACK), and later
            # events' usage is counted from that date on.
            "timestamp": int((since if first_event else hour_start).timestamp()),
            # Stripe takes the payload's values as strings.
            "payload": {"stripe_customer_id": customer_id, "value": str(value)},
        }
        OutboxMessage.objects.create(id=row_ids[renter_id], operation=OPERATION, payload=payload, user_id=renter_id)
        written += 1
    return written


def _reported(renter_ids: list) -> dict:
    """Per renter: (micro-units reported in meter events so far, start of the first event's hour)."""
    payload = KeyTransform("payload", "payload")
    rows = (
        OutboxMessage.objects.filter(operation=OPERATION, user_id__in=renter_ids)
        .order_by()
        .values("user_id")
        .annotate(
            total=Sum(Cast(KeyTextTransform("value", payload), BigIntegerField())),
            first=Min(Cast(KeyTextTransform("timestamp", "payload"), BigIntegerField())),
        )
    )
    return {row["user_id"]: (row["total"] or 0, datetime.fromtimestamp(row["first"], UTC)) for row in rows}


def _first_usage_hour(renter_id, *, hour_start: datetime, until: datetime) -> datetime | None:
    """Start of the hour of the renter's first usage within FIRST_LOOKBACK of ``hour_start``."""
    first = UsageSample.objects.filter(
        allocation__job__renter_id=renter_id, recorded_at__gte=hour_start - FIRST_LOOKBACK, recorded_at__lt=until
    ).aggregate(first=Min("recorded_at"))["first"]
    return None if first is None else first.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _cost_recorded(renter_id, *, since: datetime, until: datetime) -> int:
    """The renter's usage recorded in [since, until), priced per allocation and rounded down per
    allocation exactly as ``usage_post`` rounds, with the same cut-offs (``BILLABLE``). Both ends
    are on the hour, so the hours rolled up (``UsageHour``) count exactly as their samples did."""
    samples = (
        UsageSample.objects.filter(allocation__job__renter_id=renter_id, recorded_at__gte=since, recorded_at__lt=until)
        .filter(BILLABLE, NOT_ROLLED_UP)
        .order_by()
        .values("allocation_id", "allocation__price_per_gpu_hour_micros")
        .annotate(gpu_ms=Sum("gpu_ms"))
    )
    hours = (
        UsageHour.objects.filter(allocation__job__renter_id=renter_id, hour__gte=since, hour__lt=until)
        .order_by()
        .values("allocation_id", "allocation__price_per_gpu_hour_micros")
        .annotate(gpu_ms=Sum("billable_gpu_ms"))
    )
    used: defaultdict[tuple, int] = defaultdict(int)
    for row in [*samples, *hours]:
        used[row["allocation_id"], row["allocation__price_per_gpu_hour_micros"]] += row["gpu_ms"]
    return sum(usage_cost_micros(gpu_ms=gpu_ms, price_per_gpu_hour_micros=price) for (_, price), gpu_ms in used.items())
