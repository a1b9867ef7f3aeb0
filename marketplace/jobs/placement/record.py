"""The placement record: which of the job's rules and the owner's policy allowed a placement,
and the facts placement reads back about a job's past placements (the units that refused it)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TypedDict
from uuid import UUID

from django.conf import settings
from django.db.models import Q

from marketplace.jobs import jurisdictions
from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.placement.rules import Choice, UnitState
from nodes.agent.protocol import REFUSED, REFUSED_FOR_LIMITS


class PlacementRecord(TypedDict):
    """``Allocation.placement_record``, what ``GET /api/v1/jobs/{id}/placements`` serves.

    country, subdivision: the unit's declared location when it was chosen (it may change later).
    policy: each rule of the job and the owner's policy that held, as ``policy`` below builds it:
    jurisdiction, verified_location, isolation, price, requirements, owner_policy, ranking and
    units_considered."""

    country: str
    subdivision: str
    policy: dict


def allocation_record(job: Job, state: UnitState, choice: Choice, summary: dict) -> PlacementRecord:
    profile = state.profile
    return PlacementRecord(
        country=profile.country, subdivision=profile.subdivision, policy=placement_record(job, state, choice, summary)
    )


def placement_record(job: Job, state: UnitState, choice: Choice, summary: dict) -> dict:
    """Which of the job's rules and the owner's policy allowed this placement, for the audit trail."""
    profile = state.profile
    where = profile.subdivision or profile.country
    matched = jurisdictions.match(job.jurisdictions, profile.country, profile.subdivision) if job.jurisdictions else ""
    return {
        "jurisdiction": {"required": list(job.jurisdictions), "unit": where, "matched": matched or "anywhere"},
        "verified_location": {
            "required": job.require_verified_location,
            "verified": profile.verified,
            "observed_country": state.evidence.get("observed_country", ""),
            "attested": state.evidence.get("attested", False),
        },
        "isolation": {"required": job.isolation, "offered": list(profile.isolation_levels)},
        "price": {
            "cap_per_gpu_hour_micros": job.max_price_per_gpu_hour_micros,
            "per_gpu_hour_micros": choice.price,
            "interruptible": job.interruptible,
            "interruptible_price_percent": profile.interruptible_price_percent if job.interruptible else None,
        },
        "requirements": {
            "gpu_count": job.gpu_count,
            "gpu_models": list(job.gpu_models),
            "min_vram_gb": job.min_vram_gb,
            "min_cuda": job.min_cuda,
            "gpu_milli": job.gpu_milli,
        },
        "owner_policy": {
            "workload_classes": list(profile.workload_classes),
            "workload_class": job.workload_class,
            "renters_accepted": profile.renters_accepted,
            "max_job_duration_s": profile.max_job_duration_s,
            "availability": list(profile.availability),
            "job_max_duration_s": job.max_duration_s,
        },
        "ranking": {"preference": job.rank, "packing_policy": "fgd", "packing_cost": choice.cost},
        "units_considered": summary["units_considered"],
    }


def units_that_refused(job: Job, *, now: datetime) -> set[UUID]:
    """Units whose agents refused this job and are kept away from it: sending it there again
    would only repeat that. A refusal because of a backyard limit (quiet hours, heat, power)
    holds for REFUSAL_HOLD_S; the others (residency, isolation, devices, …) for good. Read
    from the allocations' release reasons, not from the audit trail."""
    held_since = now - timedelta(seconds=settings.REFUSAL_HOLD_S)
    refused = Allocation.objects.filter(job=job, release_reason__startswith=REFUSED).filter(
        ~Q(release_reason=REFUSED_FOR_LIMITS) | Q(released_at__gte=held_since)
    )
    return set(refused.values_list("unit_id", flat=True))
