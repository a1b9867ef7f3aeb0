"""What a renter reads about one job beyond its row: its timeline, its output and its usage."""

from dataclasses import dataclass

from django.db.models import Q, Sum
from django.utils import timezone

from marketplace.jobs.models import Allocation, Job, LogChunk, ServiceTraffic
from marketplace.jobs.selectors import allocations_with_usage
from marketplace.kernel.models import AuditEvent
from marketplace.kernel.money import from_micros

# The detail keys a renter may see. Anything else an event holds (slice ids, ledger keys, the job
# that preempted this one, which belongs to another renter) stays internal.
EVENT_DETAIL_KEYS = ("allocation", "unit", "country", "subdivision", "reason", "previous", "exit_code", "attempts")
SYSTEM_ACTORS = ("placement", "liveness", "agent", "residency")
LOG_POLL_S = 0.5  # how often a long-polling read looks for new output


def job_events(job: Job):
    """The job's own audit trail, oldest first; ledger postings are bookkeeping, shown by usage instead."""
    own = Q(action__startswith="job.") | Q(action__startswith="allocation.")
    return AuditEvent.objects.filter(own, subject_id=job.pk).order_by("created_at", "id")


def event_actor(event: AuditEvent, job: Job) -> str:
    """Who did it, without naming other people: "renter", "staff", "unit:<id>" or the system part."""
    actor = event.actor or ""
    if actor.startswith("user:"):
        return "renter" if actor == f"user:{job.renter_id}" else "staff"
    if actor.startswith("unit:") or actor in SYSTEM_ACTORS:
        return actor
    return "system"


def event_detail(event: AuditEvent) -> dict:
    data = event.data or {}
    detail = {key: data[key] for key in EVENT_DETAIL_KEYS if key in data}
    if "price_per_gpu_hour_micros" in data:
        detail["price_per_gpu_hour"] = str(from_micros(data["price_per_gpu_hour_micros"]))
    if event.action == "job.placed" and "policy" in data:
        detail["policy"] = data["policy"]  # the rules that allowed the placement: the renter's to audit
    return detail


@dataclass(frozen=True)
class LogPage:
    offset: int
    next_offset: int
    data: str
    complete: bool


def _job_chunks(job: Job):
    """The stored output of the job's allocations, oldest allocation first, each in offset order."""
    return LogChunk.objects.filter(allocation__job=job).order_by("allocation__created_at", "allocation_id", "offset")


def _job_log_bytes(job: Job) -> bytes:
    return "".join(_job_chunks(job).values_list("data", flat=True)).encode()


def job_log_read(job: Job, *, offset: int, limit: int) -> LogPage:
    """Up to ``limit`` bytes of the job's output from byte ``offset`` (UTF-8), never splitting a
    character. ``complete`` once the job has ended and nothing is stored past the page.

    The state is read before the output, so output stored before the job ended is never missed.
    """
    final = Job.objects.filter(pk=job.pk, state__in=Job.FINAL_STATES).exists()
    log = _job_log_bytes(job)
    if offset < len(log) and (log[offset] & 0xC0) == 0x80:
        raise ValueError("The offset is inside a character; use a next_offset this endpoint returned.")
    page = log[offset : offset + limit]
    text = page.decode(errors="ignore")  # drops only a character cut off at the end
    if not text and page:  # the limit is smaller than the next character: return that character whole
        text = log[offset : offset + 4].decode(errors="ignore")[:1]
    next_offset = min(offset, len(log)) + len(text.encode())
    return LogPage(offset=offset, next_offset=next_offset, data=text, complete=final and next_offset >= len(log))


def job_log_ready(job: Job, *, offset: int) -> bool:
    """Whether a read from ``offset`` has something new to say: output past it, or the job's end."""
    return Job.objects.filter(pk=job.pk, state__in=Job.FINAL_STATES).exists() or len(_job_log_bytes(job)) > offset


def job_allocations_usage(job: Job) -> list[Allocation]:
    """The job's allocations, oldest first, each annotated with its usage and charge in one query."""
    return list(allocations_with_usage(Allocation.objects.filter(job=job).order_by("created_at", "id")))


def job_traffic_today(job) -> dict[int, int]:
    """Requests the relay served today to each of the job's ports (stored every few seconds)."""
    return jobs_traffic_today([job]).get(job.pk, {})


def jobs_traffic_today(jobs) -> dict:
    """Requests the relay served today, job id -> {port: requests}, for these jobs, in one query."""
    if not jobs:
        return {}
    rows = (
        ServiceTraffic.objects.filter(job__in=jobs, day=timezone.now().date())
        .values_list("job_id", "port")
        .annotate(total=Sum("requests"))
    )
    found: dict = {}
    for job_id, port, total in rows:
        found.setdefault(job_id, {})[port] = total
    return found
