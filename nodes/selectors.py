from django.db.models import Count, Q

from nodes.models import Unit


def units_for(user):
    """The caller's units with GPU counts, for the portal list."""
    busy = Q(slices__leases__released_at__isnull=True, slices__leases__isnull=False)
    return Unit.objects.visible_to(user).annotate(
        gpu_total=Count("gpus", filter=Q(gpus__present=True), distinct=True),
        gpu_busy=Count("slices", filter=busy, distinct=True),
    )
