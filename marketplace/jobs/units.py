"""What the jobs app tells about units: their slices leased now, what runs on them for their
owner's page, and their reliability from the allocations they kept. The first two answer
``nodes.ports``."""

from datetime import datetime, timedelta

from django.db.models import Count, Exists, F, FloatField, OuterRef, Prefetch, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Cast, Coalesce
from django.utils import timezone

from marketplace.jobs.models import Allocation, Lease, ServiceTraffic
from nodes.agent.protocol import REFUSED, Finish, Refused
from nodes.models import Slice, Unit
from nodes.selectors import Running, renter_alias


def _leased_now() -> Exists:
    return Exists(Lease.objects.filter(slice=OuterRef("pk"), released_at__isnull=True))


def slices_leased() -> QuerySet:
    """The slices some allocation holds now."""
    return Slice.objects.filter(_leased_now())


def slices_free() -> QuerySet:
    """The one definition of a free slice, used by offers, the owner's portal and (as a test
    checks, tests/jobs/test_free_slices.py) placement's capacity view: advertised (the owner's
    policy and backyard limits let the agent offer it now), on a GPU present and healthy, and
    held by no allocation."""
    return Slice.objects.filter(advertised=True, gpu__present=True, gpu__healthy=True).exclude(_leased_now())


def unit_running(unit: Unit) -> list[Running]:
    """What runs on the unit now, the renter shown only by an alias."""
    allocations = list(
        Allocation.objects.filter(unit=unit, released_at__isnull=True)
        .select_related("job")
        .prefetch_related(Prefetch("leases", queryset=Lease.objects.select_related("slice__gpu")))
        .order_by("created_at")
    )
    serving = [allocation.job_id for allocation in allocations if allocation.job.ports]
    served = dict(
        ServiceTraffic.objects.filter(job_id__in=serving)
        .values_list("job_id")
        .annotate(total=Sum(F("bytes_in") + F("bytes_out")))
        if serving
        else ()
    )
    return [unit_running_row(unit, allocation, served=served.get(allocation.job_id, 0)) for allocation in allocations]


def unit_running_row(unit: Unit, allocation: Allocation, *, why: str = "", served: int = 0) -> Running:
    """One allocation as the unit's owner may see it (``why``: what would stop it, if anything;
    ``served``: the bytes its ports served through the relay)."""
    return Running(
        job=allocation.job.name or str(allocation.job_id)[:8],
        renter=renter_alias(owner_id=unit.owner_id, renter_id=allocation.job.renter_id),
        gpus=sorted({lease.slice.gpu.index for lease in allocation.leases.all()}),
        started_at=allocation.job.started_at or allocation.created_at,
        interruptible=allocation.interruptible,
        price_per_gpu_hour_micros=allocation.price_per_gpu_hour_micros,
        why=why,
        ports=tuple(entry["port"] for entry in allocation.job.ports or []),
        served_bytes=served or 0,
    )


RELIABILITY_WINDOW = timedelta(days=30)
# Release reasons that mean the unit did not keep a job it was given: it went offline, its agent
# forgot the job or never picked it up, the owner stopped the agent under it, the unit's location
# stopped meeting the job's residency rules ("residency": its declaration or its evidence moved),
# or the agent refused it (for any reason: even a backyard limit that came into force is the
# owner's doing, and refusing must never improve a unit's standing). Every other ending (the
# job's own exit or timeout, a renter's cancel, a preemption) is the unit keeping its word.
UNIT_LOST_REASONS = (
    "unit_offline", "agent_lost", "not_acknowledged", Finish.AGENT_STOPPED, Finish.DRAINED, "residency",
)  # fmt: skip
_UNIT_LOST = Q(release_reason__in=UNIT_LOST_REASONS) | Q(release_reason__startswith=REFUSED)
# A refusal the job itself caused (its image names a registry the owner's policy does not allow)
# is left out of the score either way: counting it lost would let a renter lower every unit's
# standing with images no owner allows, counting it kept would let a unit raise its own.
_NOT_COUNTED = Q(release_reason=Refused.REGISTRY)


def unit_reliability_update(unit_id, *, now: datetime | None = None) -> None:
    """Recompute the unit's reliability from its allocations released in the last 30 days, as
    (kept + 1) / (total + 2) so a new unit starts at 0.5. One UPDATE with the count as a
    subquery. Leaves the capacity version alone: reliability ranks units, it never makes one
    more or less able to take a job."""
    since = (now or timezone.now()) - RELIABILITY_WINDOW
    total, lost = Count("pk"), Count("pk", filter=_UNIT_LOST)
    score = (
        _counted(Allocation.objects.filter(unit_id=unit_id, released_at__gte=since))
        .order_by()
        .values("unit_id")
        .annotate(score=(Cast(total - lost, FloatField()) + 1.0) / (Cast(total, FloatField()) + 2.0))
        .values("score")
    )
    Unit.objects.filter(pk=unit_id).update(reliability=Coalesce(Subquery(score), 0.5))


def unit_jobs_counted(unit: Unit, *, now: datetime | None = None) -> int:
    """How many of the unit's jobs its reliability counts now: allocations released in the
    last 30 days. None yet means the figure is only the starting 0.5 (answers
    ``nodes.ports.unit_jobs_counted`` for the portal)."""
    since = (now or timezone.now()) - RELIABILITY_WINDOW
    return _counted(Allocation.objects.filter(unit=unit, released_at__gte=since)).count()


def _counted(allocations: QuerySet) -> QuerySet:
    return allocations.exclude(_NOT_COUNTED)
