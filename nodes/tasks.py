from celery import shared_task
from django.utils import timezone

from nodes import ports
from nodes.services import ingest_reachable, units_mark_unresponsive


@shared_task
def unit_liveness_sweep() -> None:
    now = timezone.now()
    units_mark_unresponsive(now=now, ingest_up=ingest_reachable())
    ports.liveness_swept(now=now)
