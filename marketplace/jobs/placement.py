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

import gc
import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple
from uuid import UUID

from celery.utils.log import current_process_index
from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from marketplace.accounts.selectors import renter_verified
from marketplace.jobs import jurisdictions, packing, ports
from marketplace.jobs.models import Allocation, Job, Lease
from marketplace.kernel.models import AuditEvent
from marketplace.kernel.money import run_cost_micros
from nodes import availability
from nodes.agent.protocol import REFUSED_FOR_LIMITS
from nodes.models import Isolation, RentersAccepted, Slice, Unit, interruptible_price

# Units are re-read when changed within this long before the last refresh, so a transaction
# that committed a little after it stamped its change is not missed.
REFRESH_OVERLAP = timedelta(milliseconds=500)
# Every unit's version is checked against the view this often, to catch a change the refresh
# window missed (a transaction that committed long after it stamped its change).
AUDIT_AFTER_S = 10.0
# The packing policy is derived again from the recent workload this often.
POLICY_AFTER_S = 60.0
# The view is rebuilt from scratch about every PLACEMENT_REBUILD_INTERVAL_S, give or take this
# share, so that the worker's processes are not all busy rebuilding at once.
REBUILD_JITTER = 0.2
# How many other units to try when claims keep losing races, before leaving the job queued.
CLAIM_TRIES = 8
# How many queued jobs a pass decides for and claims in one transaction.
PASS_BATCH = 50
# How many newly submitted jobs one submit's task may place along with its own.
FAST_BATCH = 20
# How long a signature that found nothing is believed, even if no capacity changed (windows open).
NOTHING_FOUND_TTL_S = 30.0
# How long a unit whose heartbeats stopped is skipped before it is tried again.
UNRESPONSIVE_HOLD_S = 2.0
CHOICE_CACHE_SIZE = 200_000
# An on-demand job that stopped interruptible jobs waits this long for their agents to free the
# GPUs before it may stop others.
PREEMPTION_WAIT_S = 120.0
# How many recent jobs describe the workload the packing policy plans for.
WORKLOAD_SAMPLE = 1000
# The workload assumed before any job was seen: mostly single GPUs, some gangs.
DEFAULT_TASK_TYPES = [
    packing.TaskType(0, 1, packing.MILLI, 0.55),
    packing.TaskType(0, 2, packing.MILLI, 0.2),
    packing.TaskType(0, 4, packing.MILLI, 0.15),
    packing.TaskType(0, 8, packing.MILLI, 0.1),
]
PLACEABLE = (Unit.Status.ONLINE, Unit.Status.SUSPECT, Unit.Status.OFFLINE, Unit.Status.DRAINING)


class Profile(NamedTuple):
    """Everything about a unit a job's or owner's rules look at, apart from its free slices.

    Named tuples rather than dataclasses: the view hashes, compares and sorts these by the
    hundred thousand, and a tuple does that in C."""

    status: str
    country: str
    subdivision: str
    verified: bool
    subdivision_attested: bool  # an operator vouched for the declared subdivision, not just the country
    isolation_levels: tuple[str, ...]
    workload_classes: tuple[str, ...]
    renters_accepted: str
    interruptible_price_percent: int
    max_job_duration_s: int | None
    availability: tuple
    time_zone: str
    reliability: float  # rounded, so units of nearly equal standing group together


class SliceShape(NamedTuple):
    """A free slice as a job sees it (its id aside); ordered field by field."""

    model: str
    vram_mb: int
    cuda: tuple[int, ...]
    kind: str
    isolation: str
    price: int
    milli: int


@dataclass
class UnitState:
    id: UUID
    version: int
    profile: Profile
    free: dict[UUID, list[tuple[UUID, SliceShape]]]  # gpu id -> free slices
    busy: bool  # holds at least one active lease
    exclusive: bool  # held whole by a node-level job
    evidence: dict = field(default_factory=dict)
    # Slices held by interruptible jobs no one has stopped yet: gpu id -> (slice, shape, allocation)
    preemptible: dict[UUID, list[tuple[UUID, SliceShape, UUID]]] = field(default_factory=dict)
    firm_busy: bool = False  # holds a lease no on-demand job can take away
    firm_exclusive: bool = False

    def key(self) -> tuple:
        gpus = tuple(sorted(tuple(sorted(shape for _, shape in slices)) for slices in self.free.values() if slices))
        return (self.profile, gpus, self.busy, self.exclusive)


@dataclass(eq=False)
class Group:
    """Units alike in everything placement looks at; a job is judged once per group."""

    id: int
    profile: Profile
    profile_id: int
    shards: int
    price: int | None  # the cheapest free slice on its units; None when nothing is free
    members: dict[UUID, None] = field(default_factory=dict)  # an ordered set
    by_shard: list[dict[UUID, None]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_shard = [{} for _ in range(self.shards)]


@dataclass(frozen=True)
class Choice:
    """What to take on a unit of some group, and how good that is (lower sorts first)."""

    rank: tuple
    cost: float
    take: tuple[tuple[int, int], ...]  # (position of the GPU in the unit's sorted GPUs, slice milli) pairs
    price: int  # per GPU-hour: the dearest slice taken, which the allocation locks


def cuda_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def signature(job: Job) -> tuple:
    """The requirements that decide where a job may run; jobs with equal signatures fare alike."""
    return (
        job.gpu_count,
        tuple(job.gpu_models),
        job.min_vram_gb,
        job.min_cuda,
        job.gpu_milli,
        job.isolation,
        job.max_price_per_gpu_hour_micros,
        tuple(job.jurisdictions),
        job.require_verified_location,
        job.workload_class,
        job.max_duration_s,
        job.rank,
        job.interruptible,
        job.renter_id,
    )


class CapacityView:
    """The placement worker's picture of every enrolled unit, grouped by key."""

    def __init__(self, shards: int = 1) -> None:
        self.shards = shards
        self.units: dict[UUID, UnitState] = {}
        # Groups and profiles get small integer ids, so judging a job against every group is a
        # loop of cheap lookups rather than hashing whole keys.
        self.group_by_key: dict[tuple, Group] = {}
        self.groups: dict[int, Group] = {}  # the groups that have members
        self.buckets: dict[int, dict[int, Group]] = {}  # the same with free slices, by cheapest price
        self.group_of: dict[UUID, Group] = {}
        self.preemptible_units: set[UUID] = set()  # units running interruptible jobs
        self.profile_ids: dict[Profile, int] = {}
        self.signature_ids: dict[tuple, int] = {}
        self.shapes: dict[tuple, SliceShape] = {}  # slice columns -> their (shared) shape
        self.refreshed_at: datetime | None = None
        self.doubtful: set[UUID] = set()  # units to read again at the next refresh
        self.refreshed_mono = 0.0
        self.built_at = self.audited_at = self.policy_at = 0.0
        self.rebuild_after = 0.0
        self.task_types: list[packing.TaskType] = DEFAULT_TASK_TYPES
        self.epoch = 0  # bumped when capacity may have grown, so failed signatures are retried
        self.policy: packing.Policy = packing.make_fgd(DEFAULT_TASK_TYPES)
        self.choices: dict[tuple[int, int], Choice | str] = {}  # (signature id, group id) -> verdict

    # Loading

    def refresh(self, *, force: bool = False, rebuild: bool = True) -> None:
        """Re-read the units whose capacity version moved; rebuild everything now and then
        (unless told not to: the fast path rebuilds after its commit, not with jobs held).

        Unless forced, a worker placing job after job re-reads at most every
        PLACEMENT_REFRESH_INTERVAL_S: a staler view only costs a lost claim, never a wrong one.
        """
        if self.refreshed_at is None or (rebuild and self.rebuild_due()):
            self.rebuild()
            return
        if not force and time.monotonic() - self.refreshed_mono < settings.PLACEMENT_REFRESH_INTERVAL_S:
            return
        started = timezone.now()
        if time.monotonic() - self.audited_at > AUDIT_AFTER_S:
            # Every unit's version: a unit the view lacks, holds at another version, or holds
            # but is no longer placeable is read again.
            versions = dict(Unit.objects.filter(status__in=PLACEABLE).values_list("id", "capacity_version"))
            changed = {unit_id for unit_id, version in versions.items() if self._version(unit_id) != version}
            changed |= self.units.keys() - versions.keys()
            self.audited_at = time.monotonic()
        else:
            rows = Unit.objects.filter(capacity_changed_at__gte=self.refreshed_at - REFRESH_OVERLAP).values_list(
                "id", "capacity_version"
            )
            changed = {unit_id for unit_id, version in rows if self._version(unit_id) != version}
        changed |= self.doubtful
        self.doubtful = set()
        if changed:
            self._load(sorted(changed))
        if time.monotonic() - self.policy_at > POLICY_AFTER_S:
            self._policy_update()
        self.refreshed_at = started
        self.refreshed_mono = time.monotonic()

    def rebuild_due(self) -> bool:
        return time.monotonic() - self.built_at > self.rebuild_after

    def _policy_update(self) -> None:
        """Plan packing for the workload seen lately; past verdicts stand only if it is unchanged."""
        task_types = _workload_types()
        if task_types != self.task_types:
            self.task_types = task_types
            self.policy = packing.make_fgd(task_types)
            self.choices.clear()
        self.policy_at = time.monotonic()

    def rebuild(self) -> None:
        started = timezone.now()
        self.units.clear()
        self.group_by_key.clear()
        self.groups.clear()
        self.buckets.clear()
        self.group_of.clear()
        self.preemptible_units.clear()
        self.profile_ids.clear()
        self.signature_ids.clear()
        self.shapes.clear()
        self.choices.clear()
        self.task_types = _workload_types()
        self.policy = packing.make_fgd(self.task_types)
        self._load(None)
        # The view is a million small objects that live long: leave them out of the cyclic
        # garbage collector's full passes, which would otherwise stall placement for a good
        # fraction of a second now and then. (They are still freed when no longer referenced.)
        gc.freeze()
        self.refreshed_at = started
        self.built_at = self.audited_at = self.policy_at = self.refreshed_mono = time.monotonic()
        jitter = random.uniform(1 - REBUILD_JITTER, 1 + REBUILD_JITTER)
        self.rebuild_after = settings.PLACEMENT_REBUILD_INTERVAL_S * jitter
        self.epoch += 1

    def reload(self, unit_id: UUID) -> None:
        self._load([unit_id])

    def _version(self, unit_id: UUID) -> int | None:
        state = self.units.get(unit_id)
        return None if state is None else state.version

    def _load(self, unit_ids: list | None) -> None:
        """Read units (all when unit_ids is None) with their free slices and put them in the view.

        The units (and so their versions) are read before their slices and leases: a lease
        committed in between then shows with the version before it, and a claim at that
        version loses, as it should. The other order would pair the new version with the old
        leases, and only the index would stop the claim.
        """
        for chunk in _chunks(unit_ids):
            units = Unit.objects.filter(status__in=PLACEABLE).order_by()
            slices = Slice.objects.order_by()
            leases = Lease.objects.filter(released_at__isnull=True).order_by()
            if chunk is not None:
                units = units.filter(pk__in=chunk)
                slices = slices.filter(unit_id__in=chunk)
            unit_rows = list(
                units.values(
                    "id", "capacity_version", "status", "country", "subdivision", "location_verified",
                    "isolation_levels", "workload_classes", "renters_accepted", "interruptible_price_percent",
                    "max_job_duration_s",
                    "availability", "time_zone", "reliability", "observed_country", "attested_at", "attested_country",
                    "attested_subdivision",
                )
            )  # fmt: skip
            rows = list(
                slices.values_list(
                    "id", "unit_id", "gpu_id", "gpu__model", "gpu__cuda_version", "kind", "isolation", "vram_mb",
                    "price_per_gpu_hour_micros", "milli", "advertised", "gpu__present", "gpu__healthy",
                )
            )  # fmt: skip
            if chunk is not None:
                # By slice, so the partial unique index on active leases answers it directly.
                leases = leases.filter(slice_id__in=[row[0] for row in rows])
            held = set()
            busy_units: dict[UUID, bool] = {}  # unit id -> held whole by a node-level job
            firm_units: dict[UUID, bool] = {}  # the same, counting only leases no job can take away
            interruptible: dict[UUID, UUID] = {}  # slice id -> the allocation an on-demand job may stop
            for slice_id, unit_id, isolation, allocation_id, can_stop, stopping in leases.values_list(
                "slice_id", "slice__unit_id", "allocation__job__isolation", "allocation_id",
                "allocation__interruptible", "allocation__preempted_at",
            ):  # fmt: skip
                held.add(slice_id)
                node = isolation == Isolation.NODE
                busy_units[unit_id] = busy_units.get(unit_id, False) or node
                if can_stop and stopping is None:
                    interruptible[slice_id] = allocation_id
                else:
                    firm_units[unit_id] = firm_units.get(unit_id, False) or node
            free: dict[UUID, dict] = defaultdict(lambda: defaultdict(list))
            preempt: dict[UUID, dict] = defaultdict(lambda: defaultdict(list))
            shapes = self.shapes
            for row in rows:
                slice_id, unit_id, gpu_id, model, cuda, kind, isolation, vram_mb, price, milli, *offered = row
                if not all(offered) or (slice_id in held and slice_id not in interruptible):
                    continue
                # Thousands of slices share a handful of shapes: one object each.
                described = (model, vram_mb, cuda, kind, isolation, price, milli)
                shape = shapes.get(described)
                if shape is None:
                    shape = SliceShape(model, vram_mb, cuda_tuple(cuda), kind, isolation, price, milli)
                    shapes[described] = shape
                if slice_id in held:
                    preempt[unit_id][gpu_id].append((slice_id, shape, interruptible[slice_id]))
                else:
                    free[unit_id][gpu_id].append((slice_id, shape))
            seen = set()
            for unit in unit_rows:
                seen.add(unit["id"])
                state = _unit_state(unit, free.get(unit["id"], {}), busy_units)
                state.preemptible = dict(preempt.get(unit["id"], {}))
                state.firm_busy, state.firm_exclusive = unit["id"] in firm_units, firm_units.get(unit["id"], False)
                self._put(state)
            for unit_id in chunk or ():
                if unit_id not in seen:
                    self._drop(unit_id)

    def _put(self, state: UnitState) -> None:
        old = self.units.get(state.id)
        if (
            old is None
            or old.profile != state.profile
            or not _free_ids(state) <= _free_ids(old)
            or not _preemptible_ids(state) <= _preemptible_ids(old)
        ):
            self.epoch += 1
        self._drop(state.id)
        self.units[state.id] = state
        key = state.key()
        group = self.group_by_key.get(key)
        if group is None:
            profile_id = self.profile_ids.setdefault(state.profile, len(self.profile_ids))
            prices = [shape.price for slices in state.free.values() for _, shape in slices]
            group = Group(len(self.group_by_key), state.profile, profile_id, self.shards, min(prices, default=None))
            self.group_by_key[key] = group
        group.members[state.id] = None
        group.by_shard[state.id.int % self.shards][state.id] = None
        self.groups[group.id] = group
        if group.price is not None:
            self.buckets.setdefault(group.price, {})[group.id] = group
        self.group_of[state.id] = group
        if state.preemptible:
            self.preemptible_units.add(state.id)

    def _drop(self, unit_id: UUID) -> None:
        self.units.pop(unit_id, None)
        self.preemptible_units.discard(unit_id)
        group = self.group_of.pop(unit_id, None)
        if group is not None:
            del group.members[unit_id]
            del group.by_shard[unit_id.int % self.shards][unit_id]
            if not group.members:
                del self.groups[group.id]
                if group.price is not None:
                    bucket = self.buckets[group.price]
                    del bucket[group.id]
                    if not bucket:
                        del self.buckets[group.price]

    def forget(self, unit_id: UUID) -> None:
        """Drop a unit whose state in the view is in doubt; the next refresh reads it again."""
        self._drop(unit_id)
        self.doubtful.add(unit_id)

    def bump(self, unit_id: UUID, version: int) -> None:
        """Our claim on the unit was won: the view of it stays, at the unit's new version."""
        state = self.units.get(unit_id)
        if state is not None:
            state.version = version

    def signature_id(self, sig: tuple) -> int:
        return self.signature_ids.setdefault(sig, len(self.signature_ids))

    def taken(self, state: UnitState, slice_ids: set, *, exclusive: bool) -> None:
        """Record a lease about to be claimed; the version moves only once the claim is won."""
        state = self.units[state.id]
        free = {gpu: [s for s in slices if s[0] not in slice_ids] for gpu, slices in state.free.items()}
        self._put(
            UnitState(
                state.id,
                state.version,
                state.profile,
                {gpu: slices for gpu, slices in free.items() if slices},
                busy=True,
                exclusive=state.exclusive or exclusive,
                evidence=state.evidence,
                preemptible=state.preemptible,
                firm_busy=True,
                firm_exclusive=state.firm_exclusive or exclusive,
            )
        )

    def preempting(self, unit_id: UUID, allocation_ids: set[UUID]) -> None:
        """Record interruptible jobs about to be stopped: no other job may count on stopping them."""
        state = self.units[unit_id]
        left = {gpu: [s for s in slices if s[2] not in allocation_ids] for gpu, slices in state.preemptible.items()}
        state.preemptible = {gpu: slices for gpu, slices in left.items() if slices}
        if not state.preemptible:
            self.preemptible_units.discard(unit_id)


def _chunks(unit_ids: list | None, size: int = 500):
    if unit_ids is None:
        yield None
        return
    for start in range(0, len(unit_ids), size):
        yield unit_ids[start : start + size]


def _free_ids(state: UnitState) -> set:
    return {slice_id for slices in state.free.values() for slice_id, _ in slices}


def _preemptible_ids(state: UnitState) -> set:
    return {held[0] for slices in state.preemptible.values() for held in slices}


def _unit_state(row: dict, free: dict, busy_units: dict) -> UnitState:
    profile = Profile(
        status=row["status"],
        country=row["country"],
        subdivision=row["subdivision"],
        verified=row["location_verified"],
        subdivision_attested=bool(
            row["subdivision"]
            and row["attested_at"] is not None
            and (row["attested_country"], row["attested_subdivision"]) == (row["country"], row["subdivision"])
        ),
        isolation_levels=tuple(sorted(row["isolation_levels"] or ())),
        workload_classes=tuple(sorted(row["workload_classes"] or ())),
        renters_accepted=row["renters_accepted"],
        interruptible_price_percent=row["interruptible_price_percent"],
        max_job_duration_s=row["max_job_duration_s"],
        availability=availability.key(row["availability"] or []),
        time_zone=row["time_zone"],
        reliability=round(row["reliability"], 2),
    )
    attested = row["attested_at"] is not None and row["attested_country"] == row["country"]
    evidence = {"observed_country": row["observed_country"], "attested": attested}
    return UnitState(
        id=row["id"],
        version=row["capacity_version"],
        profile=profile,
        free={gpu: sorted(slices, key=_by_shape) for gpu, slices in free.items()},
        busy=row["id"] in busy_units,
        exclusive=busy_units.get(row["id"], False),
        evidence=evidence,
    )


def _by_shape(free_slice: tuple[UUID, SliceShape]) -> tuple:
    slice_id, shape = free_slice
    return shape, slice_id.int


def _workload_types() -> list[packing.TaskType]:
    """The mix of job shapes the packing policy plans for: the most recent jobs."""
    recent = Job.objects.order_by("-created_at").values_list("gpu_count", "gpu_milli")[:WORKLOAD_SAMPLE]
    tasks = [_task(count, milli or packing.MILLI) for count, milli in recent]
    return packing.typical_task_types(tasks) if tasks else DEFAULT_TASK_TYPES


def _task(gpu_count: int, milli: int) -> packing.Task:
    return packing.Task(cpu_milli=0, num_gpu=gpu_count, gpu_milli=min(milli, packing.MILLI))


# Judging one job against one group of units


@dataclass
class Pass:
    """What one placement pass knows beyond the view: the time and per-renter facts."""

    now: datetime = field(default_factory=timezone.now)
    verified_renters: dict = field(default_factory=dict)
    funds: dict = field(default_factory=dict)  # renter id -> micro-units left for new work (None: postpaid)

    def renter_verified(self, renter_id) -> bool:
        if renter_id not in self.verified_renters:
            self.verified_renters[renter_id] = renter_verified(renter_id)
        return self.verified_renters[renter_id]

    def short_of_funds(self, job: Job, choice: Choice) -> dict | None:
        """None when the renter's wallet covers a minimum run of the job at the chosen price
        (set aside for the rest of the pass); otherwise what that needs and what there is."""
        if settings.WALLET_MIN_RUN_S <= 0:
            return None
        if job.renter_id not in self.funds:
            self.funds[job.renter_id] = ports.funds_available(job.renter_id)
        available = self.funds[job.renter_id]
        if available is None:
            return None
        needed = run_cost_micros(
            price_per_gpu_hour_micros=choice.price, gpus=len(choice.take), seconds=settings.WALLET_MIN_RUN_S
        )
        if needed > available:
            return {"needed_micros": needed, "available_micros": max(available, 0), "run_s": settings.WALLET_MIN_RUN_S}
        self.funds[job.renter_id] = available - needed
        return None


def profile_rejection(job: Job, profile: Profile, run: Pass) -> str | None:
    """Why the unit's location, state or the owner's policy rule the job out, or None."""
    if profile.status in (Unit.Status.SUSPECT, Unit.Status.OFFLINE):
        return "unit_offline"
    if profile.status == Unit.Status.DRAINING:
        return "unit_draining"
    matched = jurisdictions.match(job.jurisdictions, profile.country, profile.subdivision) if job.jurisdictions else ""
    if matched is None:
        return "jurisdiction"
    if job.require_verified_location and not _location_proven(job, profile, matched):
        return "location_unverified"
    offered = [Isolation.rank(level) for level in profile.isolation_levels]
    if not offered or max(offered) < Isolation.rank(job.isolation):
        return "isolation"
    if job.workload_class not in profile.workload_classes:
        return "workload_class"
    if profile.renters_accepted == RentersAccepted.VERIFIED and not run.renter_verified(job.renter_id):
        return "renter_unverified"
    if profile.max_job_duration_s is not None and job.max_duration_s > profile.max_job_duration_s:
        return "max_duration"
    if not availability.allows(profile.availability, profile.time_zone, run.now, job.max_duration_s):
        return "availability"
    return None


def _location_proven(job: Job, profile: Profile, matched: str) -> bool:
    """Whether the evidence covers the code that admits the unit. Address evidence proves a
    country only, so a unit admitted by a subdivision alone needs an operator's attestation of
    that subdivision; a broader code of the job that admits it too is enough otherwise."""
    if not profile.verified:
        return False
    if "-" not in matched or profile.subdivision_attested:
        return True
    broader = [code for code in job.jurisdictions if "-" not in code]
    return bool(broader) and jurisdictions.match(broader, profile.country, profile.subdivision) is not None


def charged(job: Job, profile: Profile, price: int) -> int:
    """What the job pays per GPU-hour for a slice at this price: less if it is interruptible."""
    return interruptible_price(price, profile.interruptible_price_percent) if job.interruptible else price


def slice_rejection(job: Job, shape: SliceShape, profile: Profile) -> str | None:
    if job.gpu_models and shape.model not in job.gpu_models:
        return "gpu_model"
    if shape.vram_mb < job.min_vram_gb * 1024:
        return "vram"
    if job.min_cuda and shape.cuda < cuda_tuple(job.min_cuda):
        return "cuda"
    if Isolation.rank(shape.isolation) < Isolation.rank(job.isolation) and job.isolation != Isolation.NODE:
        return "isolation"
    cap = job.max_price_per_gpu_hour_micros
    if cap is not None and charged(job, profile, shape.price) > cap:
        return "price_cap"
    if job.gpu_milli is not None and shape.milli < job.gpu_milli:
        return "gpu_share"
    return None


def _sorted_gpus(state: UnitState) -> list[list[tuple[UUID, SliceShape]]]:
    """The unit's GPUs with free slices in a canonical order, so a choice made on one member of
    a group means the same GPUs on every other member."""
    return sorted((slices for slices in state.free.values() if slices), key=lambda s: [shape for _, shape in s])


def choose(job: Job, state: UnitState, policy: packing.Policy) -> Choice | str:
    """The best way to fit the job on this unit, or why it does not fit (free slices only)."""
    if job.isolation == Isolation.NODE and state.busy:
        return "unit_busy"
    if job.isolation != Isolation.NODE and state.exclusive:
        return "unit_busy"
    gpus = _sorted_gpus(state)
    reasons: Counter = Counter()
    usable: list[tuple[int, list[SliceShape]]] = []  # (gpu position, usable free slice shapes)
    for position, slices in enumerate(gpus):
        fitting = []
        for _, shape in slices:
            why = slice_rejection(job, shape, state.profile)
            if why:
                reasons[why] += 1
            else:
                fitting.append(shape)
        if fitting:
            usable.append((position, fitting))
    if job.isolation == Isolation.NODE:
        # The whole unit or nothing: a GPU the job cannot use would be left for others.
        if reasons:
            return reasons.most_common(1)[0][0]
        if len(usable) < job.gpu_count:
            return "capacity"
        take = tuple((position, shape.milli) for position, shapes in usable for shape in shapes)
        price = max(shape.price for _, shapes in usable for shape in shapes)
        return _choice(job, state, price, len(usable), take)
    if len(usable) < job.gpu_count:
        return reasons.most_common(1)[0][0] if reasons and not usable else "capacity"
    return _pack(job, state, usable, policy)


def _pack(job: Job, state: UnitState, usable: list, policy: packing.Policy) -> Choice:
    """Pick the GPUs (and the share on each) that keep the unit least fragmented."""
    # A GPU's free capacity is the sum of its free usable slices; a job takes one slice per GPU.
    devices = [
        (position, sum(s.milli for s in shapes), min(shapes, key=lambda s: (s.milli, s.price)))
        for position, shapes in usable
    ]
    gang = job.gpu_count
    # Gangs of whole GPUs and single slices are what the packing model knows; a gang of shares
    # (rare) is placed by best fit alone.
    whole = all(free == packing.MILLI and shape.milli == packing.MILLI for _, free, shape in devices)
    cost, gpu_free = 0.0, -1
    if gang == 1 or whole:
        needed = min(shape.milli for _, _, shape in devices) if gang == 1 else packing.MILLI
        task = _task(gang, needed)
        packing_state: packing.State = (0, 0, tuple(sorted(free for _, free, _ in devices)))
        scored = policy(packing_state, task)
        if scored is not None:
            cost, gpu_free = scored
    if gang == 1:
        # The device the policy chose, or the tightest one; the smallest usable slice on it.
        fits = [d for d in devices if gpu_free == -1 or d[1] == gpu_free] or devices
        position, free, shape = min(fits, key=lambda d: (d[1], d[2].milli, d[0]))
        take = ((position, shape.milli),)
        price = shape.price
    else:
        chosen = sorted(devices, key=lambda d: (d[1], d[0]))[:gang]
        take = tuple((position, shape.milli) for position, _, shape in chosen)
        price = max(shape.price for _, _, shape in chosen)
    return _choice(job, state, price, cost, take)


def _choice(job: Job, state: UnitState, price: int, cost: float, take: tuple) -> Choice:
    # The job's preference first (by what the whole job costs an hour), then the packing policy.
    price = charged(job, state.profile, price)
    total = price * len(take)
    if job.rank == Job.Rank.RELIABLE:
        rank = (-state.profile.reliability, total, cost)
    else:
        rank = (total, -state.profile.reliability, cost)
    return Choice(rank=rank, cost=cost, take=take, price=price)


def slices_for(state: UnitState, choice: Choice) -> list[UUID]:
    """The concrete slices a choice means on this unit."""
    gpus = _sorted_gpus(state)
    picked = []
    for position, milli in choice.take:
        slice_id = next(
            slice_id for slice_id, shape in gpus[position] if shape.milli == milli and slice_id not in picked
        )
        picked.append(slice_id)
    return picked


# The engine


@dataclass
class Decision:
    """A job matched to slices of a unit, not yet claimed."""

    job: Job
    unit: UnitState  # as the view had it when deciding
    choice: Choice
    slice_ids: list[UUID]
    summary: dict
    preempts: set[UUID] = field(default_factory=set)  # interruptible allocations to stop first


class Engine:
    """One worker's placement loop over its capacity view."""

    def __init__(self, shard: int = 0, shards: int = 1) -> None:
        self.view = CapacityView(shards)
        self.shard = shard % shards
        self.lock = threading.Lock()
        self.stats: Counter = Counter()  # claims won and lost, for benchmarks and operators
        # Requirement signatures that found no unit: (view epoch, when, why-pending). Jobs with
        # the same signature skip the search until capacity may have grown.
        self.nothing_found: dict[tuple, tuple[int, float, dict]] = {}
        # Units whose claim found them silent: kept out until this (monotonic) time.
        self.unresponsive: dict[UUID, float] = {}

    def place(self, jobs: list[Job], run: Pass) -> tuple[list[Allocation], list[Job]]:
        """Decide for each job in turn against the view, then claim all decisions at once.

        The caller holds the jobs locked in its transaction. Returns the allocations made and
        the jobs whose unit changed under them (a lost race), which may be tried again.
        """
        decisions: list[Decision] = []
        before: dict[UUID, UnitState] = {}
        pending: dict[UUID, tuple[Job, dict]] = {}
        for job in jobs:
            decision = self._decide(job, run, pending)
            if decision is None:
                continue
            unit_id = decision.unit.id
            before.setdefault(unit_id, decision.unit)
            # Taken in the view at once, so the batch's next job sees the unit as it will be.
            if decision.preempts:
                self.view.preempting(unit_id, decision.preempts)
            else:
                self.view.taken(decision.unit, set(decision.slice_ids), exclusive=job.isolation == Isolation.NODE)
            decisions.append(decision)
        try:
            allocations, lost, preempting = self._claim(decisions, before) if decisions else ([], [], [])
            for decision in preempting:
                pending[decision.job.pk] = (decision.job, decision.summary)
            _pending_record(pending.values())
        except DatabaseError:
            # The transaction is lost (say, a deadlock with another writer): so are this batch's
            # tentative leases in the view.
            for unit_id in before:
                self.view.forget(unit_id)
            raise
        return allocations, lost

    def _decide(self, job: Job, run: Pass, pending: dict) -> Decision | None:
        sig = signature(job)
        excluded = self._excluded(job)
        waiting = _preemption_waited_for(job)
        known = self.nothing_found.get(sig)
        fresh = known and known[0] == self.view.epoch and time.monotonic() - known[1] < NOTHING_FOUND_TTL_S
        if fresh and not excluded:
            pending[job.pk] = (job, known[2] if waiting is None else {**known[2], "preempting": waiting})
            return None
        picked, summary = self.candidates(job, sig, run, excluded)
        if picked is None:
            if waiting is None and not job.interruptible and (found := self.preemption(job, run, excluded)):
                state, choice, slice_ids, preempts = found
                if short := run.short_of_funds(job, choice):
                    pending[job.pk] = (job, {**summary, "wallet": short})
                    return None
                since = {"allocations": len(preempts), "since": run.now.isoformat()}
                return Decision(job, state, choice, slice_ids, {**summary, "preempting": since}, preempts)
            if not excluded and waiting is None:
                self.nothing_found[sig] = (self.view.epoch, time.monotonic(), summary)
            pending[job.pk] = (job, summary if waiting is None else {**summary, "preempting": waiting})
            return None
        unit_id, choice = picked
        if short := run.short_of_funds(job, choice):
            pending[job.pk] = (job, {**summary, "wallet": short})
            return None
        state = self.view.units[unit_id]
        return Decision(job, state, choice, slices_for(state, choice), summary)

    def preemption(
        self, job: Job, run: Pass, excluded: dict[UUID, str]
    ) -> tuple[UnitState, Choice, list[UUID], set[UUID]] | None:
        """Where an on-demand job that fits nowhere could run once interruptible jobs stop: the
        unit where the fewest must stop, then by the job's preference. Returns the unit, the
        choice, its slices and the interruptible allocations to stop."""
        view = self.view
        best = None
        verdicts: dict[Profile, str | None] = {}
        for unit_id in view.preemptible_units:
            if unit_id in excluded:
                continue
            state = view.units[unit_id]
            if state.profile not in verdicts:
                verdicts[state.profile] = profile_rejection(job, state.profile, run)
            if verdicts[state.profile] is not None:
                continue
            freed = {gpu: list(slices) for gpu, slices in state.free.items()}
            for gpu, slices in state.preemptible.items():
                freed.setdefault(gpu, []).extend((slice_id, shape) for slice_id, shape, _ in slices)
            room = UnitState(
                state.id,
                state.version,
                state.profile,
                {gpu: sorted(slices, key=_by_shape) for gpu, slices in freed.items()},
                busy=state.firm_busy,
                exclusive=state.firm_exclusive,
                evidence=state.evidence,
            )
            choice = choose(job, room, view.policy)
            if isinstance(choice, str):
                continue
            slice_ids = slices_for(room, choice)
            taken = set(slice_ids)
            stop = {held[2] for slices in state.preemptible.values() for held in slices if held[0] in taken}
            if not stop:
                continue  # it fits without stopping anyone: the view was stale; the next pass sees it
            key = (len(stop), choice.rank)
            if best is None or key < best[0]:
                best = (key, (state, choice, slice_ids, stop))
        return None if best is None else best[1]

    def _claim(
        self, decisions: list[Decision], before: dict[UUID, UnitState]
    ) -> tuple[list[Allocation], list[Job], list[Decision]]:
        """Lease what was decided on every unit still at the version decided on; the rest lose.
        Decisions that need interruptible jobs stopped first stop them (and are returned).

        The units are locked in one statement, in key order, so workers never deadlock; the
        partial unique index on active leases remains the guarantee behind it all.
        """
        now = timezone.now()
        fresh_after = now - settings.UNIT_SUSPECT_AFTER
        rows = (
            Unit.objects.select_for_update()
            .filter(pk__in=sorted(before))
            .order_by("pk")
            .values_list("pk", "capacity_version", "status", "last_heartbeat_at")
        )
        won = set()
        for unit_id, version, status, heartbeat in rows:
            if version != before[unit_id].version:
                self.stats["units_changed"] += 1
            elif status == Unit.Status.ONLINE and heartbeat is not None and heartbeat >= fresh_after:
                won.add(unit_id)
            else:
                # Same version, so the unit missed heartbeats; keep away until liveness decides.
                self.unresponsive[unit_id] = time.monotonic() + UNRESPONSIVE_HOLD_S
                self.stats["units_unresponsive"] += 1
        if won:
            Unit.objects.filter(pk__in=won).update(capacity_version=F("capacity_version") + 1, capacity_changed_at=now)
        # A lease made behind the capacity version's back would make this raise IntegrityError
        # (the index holds); the whole batch then rolls back and its units are read again.
        allocations = _lease([d for d in decisions if d.unit.id in won and not d.preempts], now)
        preempting = [d for d in decisions if d.unit.id in won and d.preempts]
        _preempt(preempting, now)
        # An interruptible job's slices can be stopped by others: read from the database, not tentatively held.
        reread = {d.unit.id for d in decisions if d.job.interruptible and not d.preempts}
        for unit_id in before:
            if unit_id in won and unit_id not in reread:
                self.view.bump(unit_id, before[unit_id].version + 1)
            else:
                self.view.reload(unit_id)
        lost = [d.job for d in decisions if d.unit.id not in won]
        self.stats["placed"] += len(allocations)
        if preempting:
            self.stats["preempting"] += len(preempting)
        self.stats["lost_race"] += len(lost)
        return allocations, lost, preempting

    def give_up(self, jobs: list[Job]) -> None:
        """Jobs that kept losing races stay queued until the next pass, saying why: every unit
        that could take them is counted as taken by another job meanwhile."""
        run = Pass()
        notes = []
        for job in jobs:
            rejected: Counter = Counter()
            sid = self.view.signature_id(signature(job))
            self._judge(job, sid, run, self._excluded(job), self.view.groups.values(), rejected)
            considered = len(self.view.units)
            if contended := considered - sum(rejected.values()):
                rejected["lost_race"] += contended
            notes.append((job, {"units_considered": considered, "rejected": dict(sorted(rejected.items()))}))
        _pending_record(notes)

    def _excluded(self, job: Job) -> dict[UUID, str]:
        """Units this job must not go to now, and why."""
        now = time.monotonic()
        self.unresponsive = {unit_id: until for unit_id, until in self.unresponsive.items() if until > now}
        excluded = dict.fromkeys(self.unresponsive, "unit_unresponsive")
        if job.attempts:
            excluded.update(dict.fromkeys(_units_that_refused(job), "unit_refused"))
        return excluded

    def candidates(
        self, job: Job, sig: tuple, run: Pass, excluded: dict[UUID, str]
    ) -> tuple[tuple[UUID, Choice] | None, dict]:
        """The unit to try (and what to take there), if any fits, and the why-pending summary.

        A job that ranks by price is first looked for among the cheapest units only, stopping
        at the first price some unit can take it at; only if that finds nothing are all units
        judged, which is also what the why-pending summary, counting every unit in the view
        exactly once, needs.
        """
        view = self.view
        sid = view.signature_id(sig)
        units = {"units_considered": len(view.units)}
        # (Buckets are by list price, which orders what an interruptible job pays only per unit.)
        if job.rank == Job.Rank.CHEAPEST and job.isolation != Isolation.NODE and not job.interruptible:
            found: list = []
            for price in sorted(view.buckets):
                if found and price * job.gpu_count > min(item[0][0] for item in found):
                    break
                found.extend(self._judge(job, sid, run, excluded, view.buckets[price].values(), Counter()))
            picked = self._pick(found)
            if picked is not None:
                return picked, units
        rejected: Counter = Counter()
        picked = self._pick(self._judge(job, sid, run, excluded, view.groups.values(), rejected))
        if len(view.choices) > CHOICE_CACHE_SIZE:
            view.choices.clear()
        return picked, {**units, "rejected": dict(sorted(rejected.items()))}

    def _judge(self, job: Job, sid: int, run: Pass, excluded: dict, groups: Iterable[Group], rejected: Counter) -> list:
        """The groups that can take the job, as (rank, group, eligible units or None, choice);
        every unit of the others is counted in ``rejected`` under the first reason found."""
        view = self.view
        found: list[tuple[tuple, Group, list | None, Choice]] = []
        verdicts: dict[int, str | None] = {}
        choices = view.choices
        for group in groups:
            reason = verdicts.get(group.profile_id, "")
            if reason == "":
                reason = verdicts[group.profile_id] = profile_rejection(job, group.profile, run)
            members = group.members
            if reason is None:
                choice = choices.get((sid, group.id))
                if choice is None:
                    choice = choices[sid, group.id] = choose(job, view.units[next(iter(members))], view.policy)
                if isinstance(choice, str):
                    reason = choice
            if reason is not None:
                rejected[reason] += len(members)
                continue
            if not excluded:
                found.append((choice.rank, group, None, choice))
                continue
            eligible = [unit_id for unit_id in members if unit_id not in excluded]
            for unit_id in members:
                if unit_id in excluded:
                    rejected[excluded[unit_id]] += 1
            if eligible:
                found.append((choice.rank, group, eligible, choice))
        return found

    def _pick(self, found: list[tuple[tuple, Group, list | None, Choice]]) -> tuple[UUID, Choice] | None:
        """The unit to claim: the job's preference decides first (price, or reliability); among
        units it cannot tell apart, the packing policy's best group that has a unit in this
        worker's shard, so concurrent workers pack their own units rather than all reach for
        the same one. Within a group, the unit that has been in it longest (a stable order,
        which packs better than chance)."""
        if not found:
            return None
        best = min(found, key=lambda item: item[0])
        preference = best[0][:-1]
        tier = sorted((item for item in found if item[0][:-1] == preference), key=lambda item: item[0])
        for _, group, eligible, choice in tier:
            own = group.by_shard[self.shard] if eligible is None else self._own(eligible)
            if own:
                return next(iter(own)), choice
        # No unit of this shard will do: another shard's, at random, to avoid its own worker.
        _, group, eligible, choice = tier[0]
        members = list(group.members if eligible is None else eligible)
        return members[random.randrange(len(members))], choice

    def _own(self, units: list[UUID]) -> list[UUID]:
        return [unit_id for unit_id in units if unit_id.int % self.view.shards == self.shard]


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
                    "policy": placement_record(d.job, d.unit, d.choice, d.summary),
                },
            )
            for a, d in zip(allocations, decisions, strict=True)
        ]
    )
    for d in decisions:
        d.job.state, d.job.placed_at, d.job.attempts = Job.State.PLACED, now, d.job.attempts + 1
    return allocations


def _preempt(decisions: list[Decision], now: datetime) -> None:
    """Tell the interruptible jobs in the way to stop (their agents hear it at the next
    heartbeat); the on-demand jobs stay queued and are placed as soon as the slices free."""
    for d in decisions:
        stopping = Allocation.objects.filter(pk__in=d.preempts, released_at__isnull=True, preempted_at__isnull=True)
        stopped = list(stopping.values_list("pk", "job_id", "unit_id"))
        stopping.update(preempted_at=now, preempted_by=d.job)
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


def _preemption_waited_for(job: Job) -> dict | None:
    """The interruptible jobs this job is waiting on to stop, while that is worth waiting for."""
    waiting = (job.pending_reason or {}).get("preempting")
    if not waiting:
        return None
    since = datetime.fromisoformat(waiting["since"])
    return waiting if (timezone.now() - since).total_seconds() < PREEMPTION_WAIT_S else None


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


def _units_that_refused(job: Job) -> set[UUID]:
    """Units whose agents already refused this job; sending it there again would only repeat that."""
    # A refusal because of a backyard limit (quiet hours, heat, power) passes; the others do not.
    refusals = AuditEvent.objects.filter(action="allocation.refused", subject_id=job.pk).exclude(
        data__reason=REFUSED_FOR_LIMITS
    )
    return {UUID(str(unit)) for unit in refusals.values_list("data__unit", flat=True)}


def _pending_record(jobs: Iterable[tuple[Job, dict]]) -> None:
    """Store why each job is still pending; jobs told the same thing share one update."""
    by_summary: dict[str, tuple[dict, list]] = {}
    for job, summary in jobs:
        if job.pending_reason != summary:
            by_summary.setdefault(json.dumps(summary, sort_keys=True), (summary, []))[1].append(job.pk)
            job.pending_reason = summary
    for summary, ids in by_summary.values():
        Job.objects.filter(pk__in=ids, state=Job.State.QUEUED).update(pending_reason=summary)


_engine: Engine | None = None


def engine() -> Engine:
    """This process's placement engine (one per Celery worker process). With PLACEMENT_SHARDS
    above one, the worker's process index picks the shard of units it prefers."""
    global _engine
    if _engine is None:
        index = current_process_index(base=0) or 0
        _engine = Engine(shard=index, shards=max(1, settings.PLACEMENT_SHARDS))
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


def job_place(*, job_id) -> Allocation | None:
    """Place a newly submitted job now (the fast path on submit); return its allocation.

    Jobs submitted meanwhile that no pass has looked at yet (and no other worker holds) come
    along in the same batch, up to FAST_BATCH, so that under a burst of submits one claim
    transaction serves many and the tasks for them find them placed already.
    """
    eng = engine()
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
                queued = Job.objects.select_for_update(skip_locked=True).filter(state=Job.State.QUEUED)
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


def placement_pass(*, limit: int, batch: int = PASS_BATCH, observe: Callable[[float, int], None] | None = None) -> int:
    """Capacity may have changed: try the oldest queued jobs, up to limit, in batches, each
    claimed in one transaction; return how many were placed.

    Jobs are locked with SKIP LOCKED, so workers running passes at once share the queue out
    between them rather than all deciding for the same jobs. ``observe`` is told each batch's
    seconds from locking its jobs to commit and how many it placed (benchmarks).
    """
    eng = engine()
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
    queued = Job.objects.select_for_update(skip_locked=True).filter(state=Job.State.QUEUED)
    jobs = list(queued.filter(pk__in=retry)) if retry else []
    later = queued.order_by("created_at", "id")
    if after is not None:
        created_at, pk = after
        later = later.filter(Q(created_at__gt=created_at) | Q(created_at=created_at, id__gt=pk))
    return jobs + list(later[:count])
