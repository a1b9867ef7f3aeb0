from django.db.models import Prefetch, Sum
from django.db.models.functions import Length

from billing.selectors import allocations_with_usage
from billing.services import allocation_usage
from marketplace.models import Allocation, AuditEvent, Job, LogChunk, RenterProfile


def jobs_for(user):
    """The caller's jobs with their allocations and usage, ready for serialising without N+1."""
    allocations = allocations_with_usage(Allocation.objects.select_related("unit").order_by("-created_at"))
    return Job.objects.visible_to(user).prefetch_related(Prefetch("allocations", queryset=allocations))


def job_usage(job: Job) -> tuple[int, int]:
    """(GPU-milliseconds, micro-units charged) over all of a job's allocations."""
    gpu_ms = cost = 0
    for allocation in job.allocations.all():
        if hasattr(allocation, "usage_gpu_ms"):  # annotated by jobs_for: no queries per row
            used, charged = allocation.usage_gpu_ms, -allocation.usage_wallet_micros
        else:
            used, charged = allocation_usage(allocation)
        gpu_ms += used
        cost += charged
    return gpu_ms, cost


def allocation_log_text(allocation: Allocation) -> str:
    """The job's output as its agent shipped it, in order."""
    return "".join(LogChunk.objects.filter(allocation=allocation).order_by("offset").values_list("data", flat=True))


def allocation_log_size(allocation: Allocation) -> int:
    """Characters of the job's output kept so far."""
    return LogChunk.objects.filter(allocation=allocation).aggregate(size=Sum(Length("data")))["size"] or 0


def job_placement_records(job: Job):
    """Every placement of the job, oldest first, as the audit trail recorded it."""
    return AuditEvent.objects.filter(action="job.placed", subject_id=job.pk).order_by("created_at", "id")


def renter_verified(user_id) -> bool:
    """Whether the platform has verified this renter, as owners accepting verified renters only require."""
    return RenterProfile.objects.filter(user_id=user_id, verified_at__isnull=False).exists()
