"""Placement: match a queued job to free slices on one unit and lease them atomically.

The partial unique index on active leases is the guarantee against double booking; the
free-slice query here is only the fast path, so a lost race surfaces as an IntegrityError and
placement moves on to the next candidate unit.
"""

from collections import Counter, defaultdict
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from marketplace.audit import audit_record
from marketplace.limits import REFUSED_FOR_LIMITS
from marketplace.models import Allocation, AuditEvent, Job, Lease
from nodes.models import Isolation, Slice, Unit


@dataclass
class Candidate:
    unit: Unit
    slices: list[Slice]


def _unit_rejection(job: Job, unit: Unit) -> str | None:
    """Why this unit's policy or location rules the job out, or None if it does not."""
    if job.jurisdictions and unit.country.code not in job.jurisdictions:
        return "jurisdiction"
    offered = [Isolation.rank(level) for level in unit.isolation_levels]
    if not offered or max(offered) < Isolation.rank(job.isolation):
        return "isolation"
    return None


def _slice_fits(job: Job, slice_: Slice) -> str | None:
    if job.gpu_models and slice_.gpu.model not in job.gpu_models:
        return "gpu_model"
    if slice_.vram_mb < job.min_vram_gb * 1024:
        return "vram"
    if Isolation.rank(slice_.isolation) < Isolation.rank(job.isolation) and job.isolation != Isolation.NODE:
        return "isolation"
    cap = job.max_price_per_gpu_hour_micros
    if cap is not None and slice_.price_per_gpu_hour_micros > cap:
        return "price_cap"
    return None


def _one_per_gpu(slices: list[Slice]) -> list[Slice]:
    """A job's GPUs are distinct devices: never two shares of one GPU for one job."""
    seen: set = set()
    distinct = []
    for slice_ in slices:
        if slice_.gpu_id not in seen:
            seen.add(slice_.gpu_id)
            distinct.append(slice_)
    return distinct


def _free_slices_by_unit() -> dict[Unit, list[Slice]]:
    fresh_after = timezone.now() - settings.UNIT_SUSPECT_AFTER
    slices = (
        Slice.objects.filter(
            advertised=True,
            gpu__present=True,
            gpu__healthy=True,
            unit__status=Unit.Status.ONLINE,
            unit__last_heartbeat_at__gte=fresh_after,
        )
        .exclude(pk__in=Lease.objects.filter(released_at__isnull=True).values("slice_id"))
        .select_related("unit", "gpu")
        .order_by("unit_id", "gpu__index")
    )
    by_unit: dict[Unit, list[Slice]] = defaultdict(list)
    for slice_ in slices:
        by_unit[slice_.unit].append(slice_)
    return by_unit


def _busy_unit_ids(*, exclusive_only: bool) -> set:
    """Units holding active leases; with exclusive_only, just those held whole by a node-level job."""
    leases = Lease.objects.filter(released_at__isnull=True)
    if exclusive_only:
        leases = leases.filter(allocation__job__isolation=Isolation.NODE)
    return set(leases.values_list("allocation__unit_id", flat=True).distinct())


def _units_that_refused(job: Job) -> set[str]:
    """Units whose agents already refused this job; sending it there again would only repeat that."""
    # A refusal because of a backyard limit (quiet hours, heat, power) passes; the others do not.
    refusals = AuditEvent.objects.filter(action="allocation.refused", subject_id=job.pk).exclude(
        data__reason=REFUSED_FOR_LIMITS
    )
    return {str(unit) for unit in refusals.values_list("data__unit", flat=True)}


def candidates_for(job: Job) -> tuple[list[Candidate], dict]:
    """Feasible units for the job, best first, and the why-pending summary over all units."""
    online = Unit.objects.filter(status=Unit.Status.ONLINE)
    free = _free_slices_by_unit()
    # A node-level job needs a unit nobody uses; any other job must keep off a unit held whole,
    # even if a GPU of it has come back since that job was placed.
    busy = _busy_unit_ids(exclusive_only=job.isolation != Isolation.NODE)
    refused = _units_that_refused(job)
    rejected: Counter = Counter()
    found: list[Candidate] = []
    for unit in online:
        reason = _unit_rejection(job, unit)
        if reason is None and unit.pk in busy:
            reason = "unit_busy"
        if reason is None and str(unit.pk) in refused:
            reason = "unit_refused"
        fitting: list[Slice] = []
        if reason is None:
            reasons = Counter()
            for slice_ in free.get(unit, []):
                why = _slice_fits(job, slice_)
                if why:
                    reasons[why] += 1
                else:
                    fitting.append(slice_)
            if job.isolation != Isolation.NODE:
                fitting = _one_per_gpu(fitting)
            if job.isolation == Isolation.NODE and reasons:
                # The whole unit or nothing: a GPU the job cannot use would be left for others.
                reason = reasons.most_common(1)[0][0]
            elif len(fitting) < job.gpu_count:
                reason = reasons.most_common(1)[0][0] if reasons and not fitting else "capacity"
        if reason:
            rejected[reason] += 1
        else:
            take = fitting if job.isolation == Isolation.NODE else fitting[: job.gpu_count]
            found.append(Candidate(unit=unit, slices=take))
    # Cheapest first; among equals, the unit with the fewest free slices, to keep whole units
    # free for large jobs.
    found.sort(key=lambda c: (sum(s.price_per_gpu_hour_micros for s in c.slices), len(free.get(c.unit, []))))
    summary = {"units_considered": len(online), "rejected": dict(rejected)}
    return found, summary


def _claim(job: Job, candidate: Candidate) -> Allocation | None:
    now = timezone.now()
    with transaction.atomic():
        claimed = Job.objects.filter(pk=job.pk, state=Job.State.QUEUED).update(
            state=Job.State.PLACED, placed_at=now, attempts=F("attempts") + 1, pending_reason={}
        )
        if not claimed:
            return None
        allocation = Allocation.objects.create(
            job=job,
            unit=candidate.unit,
            price_per_gpu_hour_micros=max(s.price_per_gpu_hour_micros for s in candidate.slices),
            gpu_count=len(candidate.slices),
        )
        Lease.objects.bulk_create([Lease(allocation=allocation, slice=s) for s in candidate.slices])
        audit_record(
            "job.placed",
            job.id,
            actor="placement",
            allocation=str(allocation.id),
            unit=str(candidate.unit.id),
            country=candidate.unit.country.code,
            price_per_gpu_hour_micros=allocation.price_per_gpu_hour_micros,
            slices=[str(s.id) for s in candidate.slices],
        )
        return allocation


def job_place(*, job_id) -> Allocation | None:
    """Try to place one queued job; record why it is still pending if it cannot be placed."""
    job = Job.objects.filter(pk=job_id, state=Job.State.QUEUED).first()
    if job is None:
        return None
    found, summary = candidates_for(job)
    for candidate in found:
        try:
            allocation = _claim(job, candidate)
        except IntegrityError:
            # Another worker leased one of these slices first; try the next unit.
            summary["rejected"]["lost_race"] = summary["rejected"].get("lost_race", 0) + 1
            continue
        if allocation is not None or not Job.objects.filter(pk=job.pk, state=Job.State.QUEUED).exists():
            return allocation
    Job.objects.filter(pk=job.pk, state=Job.State.QUEUED).update(pending_reason=summary)
    return None


def queued_job_ids(*, limit: int) -> list:
    return list(
        Job.objects.filter(state=Job.State.QUEUED).order_by("created_at").values_list("id", flat=True)[:limit]
    )
