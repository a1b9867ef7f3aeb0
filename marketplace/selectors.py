from django.db.models import Prefetch

from marketplace.models import Allocation, Job


def jobs_for(user):
    """The caller's jobs with their latest allocation, ready for serialising without N+1."""
    return Job.objects.visible_to(user).prefetch_related(
        Prefetch("allocations", queryset=Allocation.objects.select_related("unit").order_by("-created_at"))
    )
