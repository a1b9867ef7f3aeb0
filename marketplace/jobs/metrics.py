"""The job queue as Prometheus reads it at scrape time (``/metrics``): how many jobs wait or run
by state, how long the oldest has, and why queued jobs are pending."""

from collections import Counter

from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from marketplace.jobs.models import Job
from marketplace.jobs.pending import REASONS

ACTIVE = (Job.State.QUEUED, Job.State.PLACED, Job.State.STARTING, Job.State.RUNNING)
# The most queued jobs read for their why-pending reasons at one scrape.
PENDING_READ_MAX = 50_000


def collect():
    now = timezone.now()
    depth = GaugeMetricFamily("shedshare_jobs", "Jobs waiting or running, by state.", labels=["state"])
    age = GaugeMetricFamily(
        "shedshare_jobs_oldest_age_seconds", "Age of the oldest job in each state (since its submit).", labels=["state"]
    )
    rows = {
        row["state"]: row
        for row in Job.objects.filter(state__in=ACTIVE)
        .values("state")
        .annotate(n=Count("pk"), oldest=Min("created_at"))
    }
    for state in ACTIVE:
        row = rows.get(state)
        depth.add_metric([state], row["n"] if row else 0)
        age.add_metric([state], (now - row["oldest"]).total_seconds() if row else 0)
    yield depth
    yield age
    yield _pending()


def _pending() -> GaugeMetricFamily:
    """Queued jobs by the main reason they wait: the reason that turned most units down, or
    ``wallet`` (funds), ``preempting`` (room being made), ``not_tried`` (placement has not looked
    yet)."""
    family = GaugeMetricFamily(
        "shedshare_jobs_pending", "Queued jobs by the main reason placement gave for not placing them.",
        labels=["reason"],
    )
    counts = Counter({reason: 0 for reason in (*REASONS, "wallet", "preempting", "not_tried", "none_fit")})
    queued = Job.objects.filter(state=Job.State.QUEUED).order_by("created_at")[:PENDING_READ_MAX]
    for reason in queued.values_list("pending_reason", flat=True):
        counts[_main_reason(reason or {})] += 1
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family


def _main_reason(reason: dict) -> str:
    if not reason:
        return "not_tried"
    if reason.get("wallet"):
        return "wallet"
    if reason.get("preempting"):
        return "preempting"
    rejected = reason.get("rejected") or {}
    if not rejected:
        return "none_fit"
    name = min(rejected.items(), key=lambda item: (-item[1], item[0]))[0]
    return name if name in REASONS else "none_fit"
