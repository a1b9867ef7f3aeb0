"""Placement: match queued jobs to free slices on one unit and lease them atomically.

Each placement worker keeps a *capacity view*: every enrolled unit's policy and free slices,
held in memory and grouped so that units which are alike in everything a job can ask about
(policy, location, and the shape of what is free) are judged once per job. The view is kept
fresh cheaply: every change that matters to placement bumps the unit's ``capacity_version``
and ``capacity_changed_at`` (leases, releases, heartbeats that change what is advertised,
liveness, policy edits), so a refresh re-reads only units whose version moved.

A worker never trusts its view to lease: it claims a unit with a conditional update at the
version it decided on, and the partial unique index on active leases is the guarantee against
double booking. A lost race costs one re-read of that unit and a second choice.

Ranking: the job's preference first (cheapest, or most reliable), then the packing policy of
``marketplace.packing`` (fragmentation gradient descent), the very code the trace replay runs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

from celery.utils.log import current_process_index
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.placement.engine import PREEMPTION_WAIT_S, Engine, Pass
from marketplace.jobs.placement.rules import cuda_tuple
from marketplace.jobs.placement.view import AUDIT_AFTER_S, DEFAULT_TASK_TYPES, POLICY_AFTER_S, CapacityView

__all__ = [
    "AUDIT_AFTER_S",
    "DEFAULT_TASK_TYPES",
    "POLICY_AFTER_S",
    "PREEMPTION_WAIT_S",
    "CapacityView",
    "Engine",
    "Pass",
    "cuda_tuple",
    "engine",
    "engine_reset",
    "engine_start",
    "job_place",
    "placement_pass",
]

# How many other units to try when claims keep losing races, before leaving the job queued.
CLAIM_TRIES = 8

# How many queued jobs a pass decides for and claims in one transaction.
PASS_BATCH = 50

# How many newly submitted jobs one submit's task may place along with its own.
FAST_BATCH = 20


_engine: Engine | None = None


def engine() -> Engine:
    """This process's placement engine (one per Celery worker process), which the entry points
    use unless they are given one (``using=``: benchmarks and tests pass their own). With PLACEMENT_SHARDS
    above one, the worker's process index, after the shards of the workers before it
    (PLACEMENT_SHARD_FIRST), picks the shard of units it prefers."""
    global _engine
    if _engine is None:
        shard = settings.PLACEMENT_SHARD_FIRST + (current_process_index(base=0) or 0)
        _engine = Engine(shard=shard, shards=max(1, settings.PLACEMENT_SHARDS))
    return _engine


def engine_start(*, shard: int, shards: int) -> Engine:
    """Give this process a fresh engine for one shard of the units (benchmarks, tests)."""
    global _engine
    _engine = Engine(shard=shard, shards=shards)
    return _engine


def engine_reset() -> None:
    """Forget the capacity view (tests do this between cases, as the database is rolled back)."""
    global _engine
    _engine = None


def job_place(*, job_id, using: Engine | None = None) -> Allocation | None:
    """Place a newly submitted job now (the fast path on submit); return its allocation.

    Jobs submitted meanwhile that no pass has looked at yet (and no other worker holds) come
    along in the same batch, up to FAST_BATCH, so that under a burst of submits one claim
    transaction serves many and the tasks for them find them placed already.
    """
    eng = using or engine()
    with eng.lock:
        allocation = _job_place(eng, job_id)
        # The periodic rebuild of the view, when due, waits until no job is held for it.
        if eng.view.rebuild_due():
            eng.view.rebuild()
    return allocation


def _job_place(eng: Engine, job_id) -> Allocation | None:
    for _ in range(CLAIM_TRIES):
        try:
            with transaction.atomic():
                queued = _placeable(Job.objects.select_for_update(skip_locked=True).filter(state=Job.State.QUEUED))
                job = queued.filter(pk=job_id).first()
                if job is None:
                    return None
                fresh = queued.filter(pending_reason={}).exclude(pk=job_id).order_by("created_at", "id")
                jobs = [job, *fresh[: FAST_BATCH - 1]]
                eng.view.refresh(rebuild=False)
                allocations, lost = eng.place(jobs, Pass())
        except IntegrityError:
            continue  # the index turned a claim down: rolled back, its units read again
        if job not in lost:
            return next((a for a in allocations if a.job_id == job.pk), None)
    eng.give_up([job])
    return None


def placement_pass(
    *,
    limit: int,
    batch: int = PASS_BATCH,
    observe: Callable[[float, int], None] | None = None,
    using: Engine | None = None,
) -> int:
    """Capacity may have changed: try the oldest queued jobs, up to limit, in batches, each
    claimed in one transaction; return how many were placed.

    Jobs are locked with SKIP LOCKED, so workers running passes at once share the queue out
    between them rather than all deciding for the same jobs. ``observe`` is told each batch's
    seconds from locking its jobs to commit and how many it placed (benchmarks).
    """
    eng = using or engine()
    placed = seen = 0
    after: tuple | None = None
    lost_races: Counter = Counter()  # jobs that lost a race and will be tried again
    losing: dict = {}
    with eng.lock:
        eng.view.refresh(force=True)
        while seen < limit:
            began = time.perf_counter()
            retry = list(lost_races)
            try:
                with transaction.atomic():
                    jobs = _queued_locked(after, min(batch, limit - seen), retry)
                    if not jobs:
                        break
                    allocations, lost = eng.place(jobs, Pass())
            except IntegrityError:
                allocations, lost = [], jobs  # the index turned a claim down: all rolled back
            losing.update({job.pk: job for job in lost})
            if observe is not None:
                observe(time.perf_counter() - began, len(allocations))
            placed += len(allocations)
            fresh = [job for job in jobs if job.pk not in lost_races]
            if fresh:
                after = (fresh[-1].created_at, fresh[-1].pk)
            seen += len(fresh)
            lost_again = {job.pk for job in lost}
            for pk in retry:
                if pk not in lost_again:
                    del lost_races[pk]
            lost_races.update(lost_again)
            given_up = [pk for pk, count in lost_races.items() if count >= CLAIM_TRIES]
            for pk in given_up:
                del lost_races[pk]  # left for the next pass
            eng.give_up([losing[pk] for pk in given_up])
            eng.view.refresh()
    return placed


def _queued_locked(after: tuple | None, count: int, retry: list) -> list[Job]:
    """Queued jobs after the keyset position, oldest first, that no other worker holds; plus
    the jobs to try again."""
    queued = _placeable(Job.objects.select_for_update(skip_locked=True).filter(state=Job.State.QUEUED))
    jobs = list(queued.filter(pk__in=retry)) if retry else []
    later = queued.order_by("created_at", "id")
    if after is not None:
        created_at, pk = after
        later = later.filter(Q(created_at__gt=created_at) | Q(created_at=created_at, id__gt=pk))
    return jobs + list(later[:count])


def _placeable(queued):
    """Queued jobs, less those giving way: a job stopped for an on-demand job waits while that
    job is still queued (for PREEMPTION_WAIT_S at most), so that the placements the stop asks
    for, which workers run at once, cannot hand the freed GPUs back to the job just stopped."""
    since = timezone.now() - timedelta(seconds=PREEMPTION_WAIT_S)
    giving_way = Allocation.objects.filter(
        job=OuterRef("pk"), preempted_by__state=Job.State.QUEUED, release_reason="preempted", released_at__gte=since
    )
    return queued.exclude(Exists(giving_way))
