"""The capacity view: every enrolled unit's policy and free slices, held in memory by each
placement worker and grouped so that units alike in everything a job can ask about are judged
once. Kept fresh cheaply: every change that matters to placement bumps the unit's
``capacity_version`` and ``capacity_changed_at``, so a refresh re-reads only units whose version
moved. Reads only."""

from __future__ import annotations

import gc
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.utils import timezone

from marketplace.jobs import packing
from marketplace.jobs.models import Job, Lease
from marketplace.jobs.placement.rules import (
    Choice,
    Profile,
    SliceShape,
    UnitState,
    _by_shape,
    _free_ids,
    _preemptible_ids,
    _task,
    cuda_tuple,
)
from nodes import availability
from nodes.models import Isolation, Slice, Unit

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

CHOICE_CACHE_SIZE = 200_000

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
                    "attested_subdivision", "review_since", "agent_country",
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
        disputed=bool(row["observed_country"]) and row["observed_country"] != row["country"],
        isolation_levels=tuple(sorted(row["isolation_levels"] or ())),
        workload_classes=tuple(sorted(row["workload_classes"] or ())),
        renters_accepted=row["renters_accepted"],
        interruptible_price_percent=row["interruptible_price_percent"],
        max_job_duration_s=row["max_job_duration_s"],
        availability=availability.key(row["availability"] or []),
        time_zone=row["time_zone"],
        reliability=round(row["reliability"], 2),
        under_review=row["review_since"] is not None,
        agent_country=row["agent_country"],
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


def _workload_types() -> list[packing.TaskType]:
    """The mix of job shapes the packing policy plans for: the most recent jobs."""
    recent = Job.objects.order_by("-created_at").values_list("gpu_count", "gpu_milli")[:WORKLOAD_SAMPLE]
    tasks = [_task(count, milli or packing.MILLI) for count, milli in recent]
    return packing.typical_task_types(tasks) if tasks else DEFAULT_TASK_TYPES
