from django.db.models import Prefetch

from billing.selectors import allocations_with_usage
from marketplace.models import Allocation, Job


def jobs_for(user):
    """The caller's jobs with their allocations and usage, ready for serialising without N+1."""
    allocations = allocations_with_usage(Allocation.objects.select_related("unit").order_by("-created_at"))
    return Job.objects.visible_to(user).prefetch_related(Prefetch("allocations", queryset=allocations))
