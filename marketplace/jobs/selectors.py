from django.db.models import BigIntegerField, Case, OuterRef, Prefetch, QuerySet, Subquery, Sum, When
from django.db.models.functions import Coalesce, Length

from marketplace.jobs import ports
from marketplace.jobs.models import Allocation, Job, LogChunk, UsageHour, UsageSample
from marketplace.jobs.usage import BILLABLE


def allocations_with_usage(allocations: QuerySet) -> QuerySet:
    """Annotate each allocation with ``usage_gpu_ms`` recorded and ``usage_wallet_micros`` (the
    renter's usage legs so far, negative; billing answers that through ``ports.allocations_charged``),
    in the allocations' own query instead of two queries per row."""
    used = UsageSample.objects.filter(allocation=OuterRef("pk")).filter(BILLABLE)
    total = used.order_by().values("allocation").annotate(total=Sum("gpu_ms")).values("total")
    hours = UsageHour.objects.filter(allocation=OuterRef("pk")).order_by().values("allocation")
    rolled_up = hours.annotate(total=Sum("billable_gpu_ms")).values("total")
    # A rolled-up allocation's usage is in its hours (its samples may linger: see NOT_ROLLED_UP).
    allocations = allocations.annotate(
        usage_gpu_ms=Case(
            When(usage_rolled_up_at__isnull=True, then=Coalesce(Subquery(total), 0)),
            default=Coalesce(Subquery(rolled_up), 0),
            output_field=BigIntegerField(),
        )
    )
    return ports.allocations_charged(allocations)


def allocation_usage(allocation: Allocation) -> tuple[int, int]:
    """(GPU-milliseconds recorded, micro-units charged so far) for one allocation."""
    totals = allocations_with_usage(Allocation.objects.filter(pk=allocation.pk)).values(
        "usage_gpu_ms", "usage_wallet_micros"
    )[0]
    return totals["usage_gpu_ms"], -totals["usage_wallet_micros"]


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
    """Every placement of the job, oldest first, from its allocations' placement records."""
    return Allocation.objects.filter(job=job).order_by("created_at", "id")
