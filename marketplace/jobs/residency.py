"""Residency for as long as a job runs, not only when it is placed.

When a unit's declared location changes, its location stops being verified, or evidence (its
agent's address, the country its agent is configured for) contradicts it
(``nodes.ports.location_changed``), every job on it is checked again with the placement's own
rule (``rules.location_rejection``). A job the unit no longer suits is stopped:

- not yet picked up by the agent: its placement is withdrawn and it is queued again;
- running and restartable: the agent is told to stop it (the preemption notice) and it is queued
  again when it has stopped, without counting an attempt: the move was not the job's doing;
- running and not restartable: it ends ``failed`` with the reason, stopped the way a cancel is.

In every case usage after the moment of the breach is not billed (``Allocation.preempted_at``),
the job's timeline shows ``job.residency_breached`` with the rule, and placement keeps it off
the unit from then on because the same rule now rules the unit out.
"""

import copy
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from marketplace.jobs import services
from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.placement.rules import Location, location_rejection
from marketplace.jobs.units import unit_running_row
from marketplace.kernel.audit import audit_record
from nodes import services as nodes_services
from nodes import streams
from nodes.models import Unit
from nodes.selectors import Running

STOP_REASON = "residency"
ACTOR = "residency"

# The rules, as an owner and a renter read them.
RULES = {
    "jurisdiction": "the unit is no longer in a place the job allows",
    "location_unverified": "the unit's location is no longer verified",
    "location_disputed": "evidence now puts the unit in another country than it declares",
    "agent_country": "the unit's agent is configured for another country than the unit declares",
}


@dataclass(frozen=True)
class Breach:
    allocation: Allocation
    rule: str


def unit_location(unit: Unit) -> Location:
    """The unit's location as the residency rules read it, from its row as stored now."""
    return Location(
        country=unit.country.code,
        subdivision=unit.subdivision,
        verified=unit.location_verified,
        subdivision_attested=bool(unit.subdivision) and nodes_services.location_attested(unit),
        disputed=nodes_services.location_disputed(unit),
        agent_country=unit.agent_country,
    )


def _active(unit: Unit):
    return Allocation.objects.filter(unit=unit, released_at__isnull=True, job__state__in=Job.ACTIVE_STATES)


def residency_breaches(unit: Unit, where: Location) -> list[Breach]:
    """The unit's active allocations whose jobs a unit at ``where`` would not suit."""
    breaches = []
    for allocation in _active(unit).select_related("job"):
        rule = location_rejection(allocation.job, where)
        if rule is not None:
            breaches.append(Breach(allocation, rule))
    return breaches


def residency_stops(unit: Unit, country: str, subdivision: str) -> list[Running]:
    """What declaring the unit at (country, subdivision) would stop, for the owner's warning.
    Verification is judged as it would be after the change: an attestation covers one declared
    location, so a new declaration keeps only the address as evidence."""
    moved = copy.copy(unit)
    moved.country, moved.subdivision = country, subdivision
    where = unit_location(moved)._replace(verified=bool(nodes_services.location_evidence(moved)))
    return [
        unit_running_row(unit, breach.allocation, why=RULES[breach.rule]) for breach in residency_breaches(unit, where)
    ]


@transaction.atomic
def unit_residency_enforce(*, unit: Unit, actor: str = ACTOR) -> list[Breach]:
    """Stop every job on the unit whose residency rules its location no longer meets."""
    unit = Unit.objects.get(pk=unit.pk)
    where = unit_location(unit)
    breaches = residency_breaches(unit, where)
    for breach in breaches:
        _job_stop_for_residency(breach, where, cause=actor)
    return breaches


def _job_stop_for_residency(breach: Breach, where: Location, *, cause: str) -> None:
    allocation, now = breach.allocation, timezone.now()
    job = Job.objects.select_for_update().get(pk=allocation.job_id)
    if job.is_final:
        return
    # The notice: the agent stops the job at once (its stream) or at its next heartbeat, and
    # nothing after now is billed.
    if not Allocation.objects.filter(pk=allocation.pk, released_at__isnull=True, preempted_at__isnull=True).update(
        preempted_at=now, stop_reason=STOP_REASON
    ):
        return  # already being stopped (preempted, or an earlier breach)
    streams.nudge([allocation.unit_id])
    why = f"residency: {RULES[breach.rule]} (now {where.country}{'-' + where.subdivision if where.subdivision else ''})"
    audit_record(
        "job.residency_breached", job.id, actor=ACTOR, allocation=str(allocation.pk), unit=str(allocation.unit_id),
        reason=breach.rule, country=where.country, subdivision=where.subdivision, cause=cause,
    )  # fmt: skip
    audit_record("unit.residency_stopped_job", allocation.unit_id, actor=ACTOR, job=str(job.pk), rule=breach.rule)
    if allocation.acknowledged_at is None:
        services.allocation_withdraw(allocation, reason=STOP_REASON, actor=ACTOR)
    elif not job.restartable:
        services.job_stop(job=job, actor=ACTOR, reason=why[:255])
    # A restartable job that runs is queued again when the agent reports it stopped
    # (services._allocation_preempted), as a preempted one is.
