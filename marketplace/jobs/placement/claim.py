"""The claim: the only part of placement that writes. It locks the units decided on, in key
order, at the version decided on; leases their slices and makes the allocations (with their
placement records); tells interruptible jobs in the way to stop; and stores why the jobs left
queued are pending. The partial unique index on active leases stays the guarantee behind it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from marketplace.jobs.models import Allocation, Job, Lease
from marketplace.jobs.placement import record
from marketplace.kernel.models import AuditEvent
from marketplace.kernel.tracing import trace_enabled, trace_step
from nodes import streams
from nodes.agent import protocol
from nodes.models import Unit

# How long a unit whose heartbeats stopped is skipped before it is tried again.
UNRESPONSIVE_HOLD_S = 2.0

if TYPE_CHECKING:
    from marketplace.jobs.placement.engine import Decision, Engine
    from marketplace.jobs.placement.rules import UnitState


def _lease(decisions: list[Decision], now: datetime) -> list[Allocation]:
    """Write the placements: jobs, allocations, leases and the audit trail."""
    if not decisions:
        return []
    Job.objects.filter(pk__in=[d.job.pk for d in decisions], state=Job.State.QUEUED).update(
        state=Job.State.PLACED, placed_at=now, attempts=F("attempts") + 1, pending_reason={}
    )
    allocations = [
        Allocation(
            job=d.job,
            unit_id=d.unit.id,
            price_per_gpu_hour_micros=d.choice.price,
            gpu_count=len(d.slice_ids),
            created_at=now,
            interruptible=d.job.interruptible,
            placement_record=record.allocation_record(d.job, d.unit, d.choice, d.summary),
        )
        for d in decisions
    ]
    Allocation.objects.bulk_create(allocations)
    Lease.objects.bulk_create(
        [Lease(allocation=a, slice_id=s) for a, d in zip(allocations, decisions, strict=True) for s in d.slice_ids]
    )
    AuditEvent.objects.bulk_create(
        [
            AuditEvent(
                action="job.placed",
                subject_id=d.job.pk,
                actor="placement",
                created_at=now,
                data={
                    "allocation": str(a.id),
                    "unit": str(d.unit.id),
                    "country": d.unit.profile.country,
                    "subdivision": d.unit.profile.subdivision,
                    "price_per_gpu_hour_micros": d.choice.price,
                    "slices": [str(s) for s in d.slice_ids],
                    "policy": a.placement_record["policy"],
                },
            )
            for a, d in zip(allocations, decisions, strict=True)
        ]
    )
    for d in decisions:
        d.job.state, d.job.placed_at, d.job.attempts = Job.State.PLACED, now, d.job.attempts + 1
    if trace_enabled():
        for a, d in zip(allocations, decisions, strict=True):
            transaction.on_commit(partial(trace_step, "job.placed", d.job.pk, unit=d.unit.id, allocation=a.id))
    return allocations


def _preempt(decisions: list[Decision], now: datetime) -> None:
    """Tell the interruptible jobs in the way to stop (their agents hear it at once over their
    streams, else at the next heartbeat); the on-demand jobs stay queued and are placed as soon as the slices free."""
    for d in decisions:
        stopping = Allocation.objects.filter(pk__in=d.preempts, released_at__isnull=True, preempted_at__isnull=True)
        stopped = list(stopping.values_list("pk", "job_id", "unit_id"))
        stopping.update(preempted_at=now, preempted_by=d.job, stop_reason=protocol.Finish.PREEMPTED)
        streams.nudge([unit_id for _, _, unit_id in stopped])
        AuditEvent.objects.bulk_create(
            [
                AuditEvent(
                    action="job.preempted",
                    subject_id=job_id,
                    actor="placement",
                    created_at=now,
                    data={"allocation": str(pk), "unit": str(unit_id), "for_job": str(d.job.pk)},
                )
                for pk, job_id, unit_id in stopped
            ]
        )


def pending_record(jobs: Iterable[tuple[Job, dict]]) -> None:
    """Store why each job is still pending; jobs told the same thing share one update."""
    by_summary: dict[str, tuple[dict, list]] = {}
    for job, summary in jobs:
        if job.pending_reason != summary:
            by_summary.setdefault(json.dumps(summary, sort_keys=True), (summary, []))[1].append(job.pk)
            job.pending_reason = summary
    for summary, ids in by_summary.values():
        Job.objects.filter(pk__in=ids, state=Job.State.QUEUED).update(pending_reason=summary)


def claim(
    engine: Engine, decisions: list[Decision], before: dict[UUID, UnitState]
) -> tuple[list[Allocation], list[Job], list[Decision]]:
    """Lease what was decided on every unit still at the version decided on; the rest lose.
    Decisions that need interruptible jobs stopped first stop them (and are returned).

    The units are locked in one statement, in key order, so workers never deadlock; the
    partial unique index on active leases remains the guarantee behind it all.
    """
    now = timezone.now()
    fresh_after = now - settings.UNIT_SUSPECT_AFTER
    rows = (
        Unit.objects.select_for_update(of=("self",))
        .filter(pk__in=sorted(before))
        .order_by("pk")
        .values_list("pk", "capacity_version", "status", "last_heartbeat_at", "stream_server__renewed_at")
    )
    won = set()
    for unit_id, version, status, heartbeat, streamed in rows:
        seen = streams.seen_at(heartbeat, streamed)
        if version != before[unit_id].version:
            engine.stats["units_changed"] += 1
        elif status == Unit.Status.ONLINE and seen is not None and seen >= fresh_after:
            won.add(unit_id)
        else:
            # Same version, so the unit missed heartbeats; keep away until liveness decides.
            engine.unresponsive[unit_id] = time.monotonic() + UNRESPONSIVE_HOLD_S
            engine.stats["units_unresponsive"] += 1
    if won:
        Unit.objects.filter(pk__in=won).update(capacity_version=F("capacity_version") + 1, capacity_changed_at=now)
    # A lease made behind the capacity version's back would make this raise IntegrityError
    # (the index holds); the whole batch then rolls back and its units are read again.
    allocations = _lease([d for d in decisions if d.unit.id in won and not d.preempts], now)
    preempting = [d for d in decisions if d.unit.id in won and d.preempts]
    _preempt(preempting, now)
    streams.nudge([a.unit_id for a in allocations])  # their agents' streams push the work at once
    # An interruptible job's slices can be stopped by others: read from the database, not tentatively held.
    reread = {d.unit.id for d in decisions if d.job.interruptible and not d.preempts}
    for unit_id in before:
        if unit_id in won and unit_id not in reread:
            engine.view.bump(unit_id, before[unit_id].version + 1)
        else:
            engine.view.reload(unit_id)
    lost = [d.job for d in decisions if d.unit.id not in won]
    engine.stats["placed"] += len(allocations)
    if preempting:
        engine.stats["preempting"] += len(preempting)
    engine.stats["lost_race"] += len(lost)
    return allocations, lost, preempting
