from celery import shared_task

from billing import services
from marketplace.models import Allocation


@shared_task(acks_late=True)
def usage_post(allocation_id: str) -> None:
    """Idempotent: posting charges only what is not yet charged."""
    if Allocation.objects.filter(pk=allocation_id).exists():
        services.usage_post(allocation_id=allocation_id)
