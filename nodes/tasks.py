from celery import shared_task
from django.utils import timezone

from marketplace.services import allocations_expire_unacknowledged, unit_jobs_lost
from nodes.models import Unit
from nodes.services import units_mark_unresponsive


@shared_task
def unit_liveness_sweep() -> None:
    now = timezone.now()
    units_mark_unresponsive(now=now)
    allocations_expire_unacknowledged(now=now)
    # Driven by state rather than by what was just marked, so work left by an interrupted
    # sweep is picked up by the next one.
    # allocations__released_at__isnull alone would also match units with no allocations at all
    # (an outer join), so every unit ever lost would be revisited on every sweep.
    stranded = Unit.objects.filter(
        status=Unit.Status.OFFLINE, allocations__isnull=False, allocations__released_at__isnull=True
    )
    for unit in stranded.distinct():
        unit_jobs_lost(unit=unit)
