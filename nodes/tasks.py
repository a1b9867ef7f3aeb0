from celery import shared_task
from django.utils import timezone

from nodes import ports
from nodes.services import units_mark_unresponsive


@shared_task
def unit_liveness_sweep() -> None:
    now = timezone.now()
    units_mark_unresponsive(now=now)
    ports.liveness_swept(now=now)
