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

import heapq
import itertools
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from marketplace import jurisdictions, packing
from marketplace.audit import audit_record
from marketplace.limits import REFUSED_FOR_LIMITS
from marketplace.models import Allocation, AuditEvent, Job, Lease, RenterProfile
from nodes import availability
from nodes.models import Isolation, RentersAccepted, Slice, Unit

# Units are re-read when changed within this long before the last refresh, so a transaction
# that committed a little after it stamped its change is not missed.
REFRESH_OVERLAP = timedelta(seconds=1)
# The view is rebuilt from scratch at least this often (the deep pass), whatever was missed.
REBUILD_AFTER_S = 60.0
# How many other units to try when claims keep losing races, before leaving the job queued.
CLAIM_TRIES = 8
# How long a signature that found nothing is believed, even if no capacity changed (windows open).
NOTHING_FOUND_TTL_S = 30.0
# How long a unit whose heartbeats stopped is skipped before it is tried again.
UNRESPONSIVE_HOLD_S = 2.0
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


@dataclass(frozen=True)
class Profile:
    """Everything about a unit a job's or owner's rules look at, apart from its free slices."""

    status: str
    country: str
    subdivision: str
    verified: bool
    subdivision_attested: bool  # an operator vouched for the declared subdivision, not just the country
    isolation_levels: tuple[str, ...]
    workload_classes: tuple[str, ...]
    renters_accepted: str
    max_job_duration_s: int | None
    availability: tuple
    time_zone: str
    reliability: float  # rounded, so units of nearly equal standing group together


@dataclass(frozen=True, order=True)
class SliceShape:
    """A free slice as a job sees it (its id aside)."""

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

    def key(self) -> tuple:
        gpus = tuple(sorted(tuple(sorted(shape for _, shape in slices)) for slices in self.free.values() if slices))
        return (self.profile, gpus, self.busy, self.exclusive)


@dataclass(eq=False)
class Group:
    """Units alike in everything placement looks at; a job is judged once per group."""

    id: int
    profile: Profile
    profile_id: int
    members: dict[UUID, None] = field(default_factory=dict)  # an ordered set


@dataclass(frozen=True)
class Choice:
    """What to take on a unit of some group, and how good that is (lower sorts first)."""

    rank: tuple
    cost: float
    take: tuple[tuple[int, int], ...]  # (position of the GPU in the unit's sorted GPUs, slice milli) pairs


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
        job.renter_id,
    )


class CapacityView:
    """The placement worker's picture of every enrolled unit, grouped by key."""

    def __init__(self) -> None:
        self.units: dict[UUID, UnitState] = {}
        # Groups and profiles get small integer ids, so judging a job against every group is a
        # loop of cheap lookups rather than hashing whole keys.
        self.group_by_key: dict[tuple, Group] = {}
        self.groups: dict[int, Group] = {}  # the groups that have members
        self.group_of: dict[UUID, Group] = {}
        self.profile_ids: dict[Profile, int] = {}
        self.signature_ids: dict[tuple, int] = {}
        self.refreshed_at: datetime | None = None
        self.refreshed_mono = 0.0
        self.built_at = 0.0
        self.epoch = 0  # bumped when capacity may have grown, so failed signatures are retried
        self.policy: packing.Policy = packing.make_fgd(DEFAULT_TASK_TYPES)
        self.choices: dict[tuple[int, int], Choice | str] = {}  # (signature id, group id) -> verdict

    # Loading

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the units whose capacity version moved; rebuild everything now and then.

        Unless forced, a worker placing job after job re-reads at most every
        PLACEMENT_REFRESH_INTERVAL_S: a staler view only costs a lost claim, never a wrong one.
        """
        if self.refreshed_at is None or time.monotonic() - self.built_at > REBUILD_AFTER_S:
            self.rebuild()
            return
        if not force and time.monotonic() - self.refreshed_mono < settings.PLACEMENT_REFRESH_INTERVAL_S:
            return
        started = timezone.now()
        rows = Unit.objects.filter(capacity_changed_at__gte=self.refreshed_at - REFRESH_OVERLAP).values_list(
            "id", "capacity_version"
        )
        changed = [unit_id for unit_id, version in rows if self._version(unit_id) != version]
        if changed:
            self._load(changed)
        self.refreshed_at = started
        self.refreshed_mono = time.monotonic()

    def rebuild(self) -> None:
        started = timezone.now()
        self.units.clear()
        self.group_by_key.clear()
        self.groups.clear()
        self.group_of.clear()
        self.profile_ids.clear()
        self.signature_ids.clear()
        self.choices.clear()
        self.policy = packing.make_fgd(_workload_types())
        self._load(None)
        self.refreshed_at = started
        self.built_at = self.refreshed_mono = time.monotonic()
        self.epoch += 1

    def reload(self, unit_id: UUID) -> None:
        self._load([unit_id])

    def _version(self, unit_id: UUID) -> int | None:
        state = self.units.get(unit_id)
        return None if state is None else state.version

    def _load(self, unit_ids: list | None) -> None:
        """Read units (all when unit_ids is None) with their free slices and put them in the view."""
        for chunk in _chunks(unit_ids):
            units = Unit.objects.filter(status__in=PLACEABLE)
            slices = Slice.objects.filter(advertised=True, gpu__present=True, gpu__healthy=True)
            leases = Lease.objects.filter(released_at__isnull=True)
            if chunk is not None:
                units = units.filter(pk__in=chunk)
                slices = slices.filter(unit_id__in=chunk)
                leases = leases.filter(slice__unit_id__in=chunk)
            held = set()
            busy_units: dict[UUID, bool] = {}  # unit id -> held whole by a node-level job
            for slice_id, unit_id, isolation in leases.values_list(
                "slice_id", "slice__unit_id", "allocation__job__isolation"
            ):
                held.add(slice_id)
                busy_units[unit_id] = busy_units.get(unit_id, False) or isolation == Isolation.NODE
            free: dict[UUID, dict] = defaultdict(lambda: defaultdict(list))
            for row in slices.values_list(
                "id", "unit_id", "gpu_id", "gpu__model", "gpu__cuda_version", "kind", "isolation", "vram_mb",
                "price_per_gpu_hour_micros", "milli",
            ):  # fmt: skip
                slice_id, unit_id, gpu_id, model, cuda, kind, isolation, vram_mb, price, milli = row
                if slice_id in held:
                    continue
                shape = SliceShape(model, vram_mb, cuda_tuple(cuda), kind, isolation, price, milli)
                free[unit_id][gpu_id].append((slice_id, shape))
            seen = set()
            for unit in units.values(
                "id", "capacity_version", "status", "country", "subdivision", "location_verified",
                "isolation_levels", "workload_classes", "renters_accepted", "max_job_duration_s",
                "availability", "time_zone", "reliability", "observed_country", "attested_at", "attested_country",
                "attested_subdivision",
            ):  # fmt: skip
                seen.add(unit["id"])
                self._put(_unit_state(unit, free.get(unit["id"], {}), busy_units))
            for unit_id in chunk or ():
                if unit_id not in seen:
                    self._drop(unit_id)

    def _put(self, state: UnitState) -> None:
        old = self.units.get(state.id)
        if old is None or old.profile != state.profile or not _free_ids(state) <= _free_ids(old):
            self.epoch += 1
        self._drop(state.id)
        self.units[state.id] = state
        key = state.key()
        group = self.group_by_key.get(key)
        if group is None:
            profile_id = self.profile_ids.setdefault(state.profile, len(self.profile_ids))
            group = self.group_by_key[key] = Group(len(self.group_by_key), state.profile, profile_id)
        group.members[state.id] = None
        self.groups[group.id] = group
        self.group_of[state.id] = group

    def _drop(self, unit_id: UUID) -> None:
        self.units.pop(unit_id, None)
        group = self.group_of.pop(unit_id, None)
        if group is not None:
            del group.members[unit_id]
            if not group.members:
                del self.groups[group.id]

    def signature_id(self, job: Job) -> int:
        sig = signature(job)
        return self.signature_ids.setdefault(sig, len(self.signature_ids))

    def taken(self, state: UnitState, slice_ids: set, *, exclusive: bool) -> None:
        """Record our own lease in the view."""
        free = {gpu: [s for s in slices if s[0] not in slice_ids] for gpu, slices in state.free.items()}
        self._put(
            UnitState(
                state.id,
                state.version + 1,
                state.profile,
                {gpu: slices for gpu, slices in free.items() if slices},
                busy=True,
                exclusive=state.exclusive or exclusive,
                evidence=state.evidence,
            )
        )


def _chunks(unit_ids: list | None, size: int = 500):
    if unit_ids is None:
        yield None
        return
    for start in range(0, len(unit_ids), size):
        yield unit_ids[start : start + size]


def _free_ids(state: UnitState) -> set:
    return {slice_id for slices in state.free.values() for slice_id, _ in slices}


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
        free={gpu: sorted(slices, key=lambda s: (s[1], str(s[0]))) for gpu, slices in free.items()},
        busy=row["id"] in busy_units,
        exclusive=busy_units.get(row["id"], False),
        evidence=evidence,
    )


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

    def renter_verified(self, renter_id) -> bool:
        if renter_id not in self.verified_renters:
            profiles = RenterProfile.objects.filter(user_id=renter_id, verified_at__isnull=False)
            self.verified_renters[renter_id] = profiles.exists()
        return self.verified_renters[renter_id]


def profile_rejection(job: Job, profile: Profile, run: Pass) -> str | None:
    """Why the unit's location, state or the owner's policy rule the job out, or None."""
    if profile.status in (Unit.Status.SUSPECT, Unit.Status.OFFLINE):
        return "unit_offline"
    if profile.status == Unit.Status.DRAINING:
        return "unit_draining"
    matched = jurisdictions.match(job.jurisdictions, profile.country, profile.subdivision) if job.jurisdictions else ""
    if matched is None:
        return "jurisdiction"
    # Address evidence proves a country only; a job held to a subdivision needs an operator's
    # attestation of that subdivision.
    unproven = not profile.verified or ("-" in matched and not profile.subdivision_attested)
    if job.require_verified_location and unproven:
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


def slice_rejection(job: Job, shape: SliceShape) -> str | None:
    if job.gpu_models and shape.model not in job.gpu_models:
        return "gpu_model"
    if shape.vram_mb < job.min_vram_gb * 1024:
        return "vram"
    if job.min_cuda and shape.cuda < cuda_tuple(job.min_cuda):
        return "cuda"
    if Isolation.rank(shape.isolation) < Isolation.rank(job.isolation) and job.isolation != Isolation.NODE:
        return "isolation"
    cap = job.max_price_per_gpu_hour_micros
    if cap is not None and shape.price > cap:
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
            why = slice_rejection(job, shape)
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
        return _choice(job, state, price * len(take), len(usable), take)
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
    return _choice(job, state, price * len(take), cost, take)


def _choice(job: Job, state: UnitState, price: int, cost: float, take: tuple) -> Choice:
    # The job's preference first, then the packing policy; equal ranks are drawn at random.
    if job.rank == Job.Rank.RELIABLE:
        rank = (-state.profile.reliability, price, cost)
    else:
        rank = (price, -state.profile.reliability, cost)
    return Choice(rank=rank, cost=cost, take=take)


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


class Engine:
    """One worker's placement loop over its capacity view."""

    def __init__(self, seed: int | None = None) -> None:
        self.view = CapacityView()
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        # Requirement signatures that found no unit: (view epoch, when, why-pending). Jobs with
        # the same signature skip the search until capacity may have grown.
        self.nothing_found: dict[tuple, tuple[int, float, dict]] = {}
        # Units whose claim found them silent: kept out until this (monotonic) time.
        self.unresponsive: dict[UUID, float] = {}

    def place(self, job: Job, run: Pass) -> Allocation | None:
        """Try to place one queued job; record why it is still pending if it cannot be placed."""
        sig = signature(job)
        excluded = self._excluded(job)
        known = self.nothing_found.get(sig)
        fresh = known and known[0] == self.view.epoch and time.monotonic() - known[1] < NOTHING_FOUND_TTL_S
        if fresh and not excluded:
            _pending(job, known[2])
            return None
        for _ in range(CLAIM_TRIES):
            ranked, summary = self.candidates(job, run, excluded)
            if not ranked:
                if not excluded:
                    self.nothing_found[sig] = (self.view.epoch, time.monotonic(), summary)
                _pending(job, summary)
                return None
            unit_id, choice = ranked[0]
            outcome = self.claim(job, unit_id, choice, summary)
            if isinstance(outcome, Allocation):
                return outcome
            if outcome == "job_gone":
                return None
            if outcome == "unit_unresponsive":
                excluded[unit_id] = outcome
        # Every try lost a race to another worker: the units still free are contended.
        summary["rejected"]["lost_race"] = summary["units_considered"] - sum(summary["rejected"].values())
        _pending(job, summary)
        return None

    def _excluded(self, job: Job) -> dict[UUID, str]:
        """Units this job must not go to now, and why."""
        now = time.monotonic()
        self.unresponsive = {unit_id: until for unit_id, until in self.unresponsive.items() if until > now}
        excluded = dict.fromkeys(self.unresponsive, "unit_unresponsive")
        if job.attempts:
            excluded.update(dict.fromkeys(_units_that_refused(job), "unit_refused"))
        return excluded

    def candidates(self, job: Job, run: Pass, excluded: dict[UUID, str]) -> tuple[list[tuple[UUID, Choice]], dict]:
        """The best feasible units (one per group, best first) and the why-pending summary,
        which counts every unit in the view exactly once."""
        view = self.view
        rejected: Counter = Counter()
        found: list[tuple[tuple, list, Choice]] = []
        verdicts: dict[int, str | None] = {}
        sid = view.signature_id(job)
        choices = view.choices
        for group in view.groups.values():
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
            eligible = members
            if excluded:
                eligible = [unit_id for unit_id in members if unit_id not in excluded]
                for unit_id in members:
                    if unit_id in excluded:
                        rejected[excluded[unit_id]] += 1
            if eligible:
                found.append((choice.rank, eligible, choice))
        ranked = self._pick(found)
        if len(choices) > CHOICE_CACHE_SIZE:
            choices.clear()
        summary = {"units_considered": len(view.units), "rejected": dict(sorted(rejected.items()))}
        return ranked, summary

    def _pick(self, found: list[tuple[tuple, list, Choice]]) -> list[tuple[UUID, Choice]]:
        """Units to claim, best first: one per tier of equally ranked groups, drawn at random
        over all the tier's units (as the packing policy's ties are broken), which also keeps
        concurrent workers from all reaching for the same unit."""
        best = heapq.nsmallest(CLAIM_TRIES * 4, found, key=lambda item: item[0])
        ranked = []
        for _, tier in itertools.groupby(best, key=lambda item: item[0]):
            tier = list(tier)
            sizes = [len(eligible) for _, eligible, _ in tier]
            _, eligible, choice = tier[0] if len(tier) == 1 else self.rng.choices(tier, weights=sizes)[0]
            ranked.append((self._member(eligible), choice))
            if len(ranked) == CLAIM_TRIES:
                break
        return ranked

    def _member(self, members) -> UUID:
        if len(members) == 1:
            return next(iter(members))
        if isinstance(members, dict):
            members = list(members)
        return members[self.rng.randrange(len(members))]

    def claim(self, job: Job, unit_id: UUID, choice: Choice, summary: dict) -> Allocation | str:
        state = self.view.units[unit_id]
        slice_ids = slices_for(state, choice)
        shapes = {slice_id: shape for slices in state.free.values() for slice_id, shape in slices}
        price = max(shapes[s].price for s in slice_ids)
        now = timezone.now()
        try:
            with transaction.atomic():
                _commit_without_waiting_for_disk()
                fresh_after = now - settings.UNIT_SUSPECT_AFTER
                if not Unit.objects.filter(
                    pk=unit_id,
                    capacity_version=state.version,
                    status=Unit.Status.ONLINE,
                    last_heartbeat_at__gte=fresh_after,
                ).update(capacity_version=F("capacity_version") + 1, capacity_changed_at=now):
                    raise _Stale
                if not Job.objects.filter(pk=job.pk, state=Job.State.QUEUED).update(
                    state=Job.State.PLACED, placed_at=now, attempts=F("attempts") + 1, pending_reason={}
                ):
                    raise _JobGone
                allocation = Allocation.objects.create(
                    job=job,
                    unit_id=unit_id,
                    price_per_gpu_hour_micros=price,
                    gpu_count=len(slice_ids),
                    created_at=now,
                )
                Lease.objects.bulk_create([Lease(allocation=allocation, slice_id=s) for s in slice_ids])
                audit_record(
                    "job.placed",
                    job.id,
                    actor="placement",
                    allocation=str(allocation.id),
                    unit=str(unit_id),
                    country=state.profile.country,
                    subdivision=state.profile.subdivision,
                    price_per_gpu_hour_micros=price,
                    slices=[str(s) for s in slice_ids],
                    policy=placement_record(job, state, choice, price, summary),
                )
        except _Stale:
            return self._lost(unit_id, state.version)
        except _JobGone:
            return "job_gone"
        except IntegrityError:
            # Only a lease made behind the capacity version's back can get here; the index held.
            self.view.reload(unit_id)
            return "lost_race"
        self.view.taken(state, set(slice_ids), exclusive=job.isolation == Isolation.NODE)
        job.state, job.placed_at, job.attempts = Job.State.PLACED, now, job.attempts + 1
        return allocation

    def _lost(self, unit_id: UUID, version: int) -> str:
        """The claim found the unit changed or silent: re-read it and say which."""
        self.view.reload(unit_id)
        state = self.view.units.get(unit_id)
        if state is not None and state.version == version:
            # Same version, so the unit missed heartbeats; keep away until liveness decides.
            self.unresponsive[unit_id] = time.monotonic() + UNRESPONSIVE_HOLD_S
            return "unit_unresponsive"
        return "lost_race"

    def run_pass(self, jobs: list[Job]) -> int:
        """Place these queued jobs in order; return how many were placed."""
        with self.lock:
            self.view.refresh(force=True)
            run = Pass()
            placed = 0
            for job in jobs:
                placed += self.place(job, run) is not None
            return placed


class _Stale(Exception):
    pass


class _JobGone(Exception):
    pass


def _commit_without_waiting_for_disk() -> None:
    """On PostgreSQL, let this transaction commit without waiting for its WAL to reach disk.

    A placement is worth that trade: if the server crashes within the next fraction of a second
    the whole placement is lost at once (never half of it), the job is still queued and its
    slices free, and an agent that had already pulled it is told to stop at its next
    reconciliation. Waiting for the disk instead would cap placement at the disk's flush rate.
    Money is never written this way.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def placement_record(job: Job, state: UnitState, choice: Choice, price: int, summary: dict) -> dict:
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
        "price": {"cap_per_gpu_hour_micros": job.max_price_per_gpu_hour_micros, "per_gpu_hour_micros": price},
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


def _pending(job: Job, summary: dict) -> None:
    if job.pending_reason != summary:
        Job.objects.filter(pk=job.pk, state=Job.State.QUEUED).update(pending_reason=summary)
        job.pending_reason = summary


_engine: Engine | None = None


def engine() -> Engine:
    """This process's placement engine (one per Celery worker process)."""
    global _engine
    if _engine is None:
        _engine = Engine()
    return _engine


def engine_reset() -> None:
    """Forget the capacity view (tests do this between cases, as the database is rolled back)."""
    global _engine
    _engine = None


def job_place(*, job_id) -> Allocation | None:
    """Try to place one queued job now (the fast path on submit)."""
    job = Job.objects.filter(pk=job_id, state=Job.State.QUEUED).first()
    if job is None:
        return None
    eng = engine()
    with eng.lock:
        eng.view.refresh()
        return eng.place(job, Pass())


def placement_pass(*, limit: int) -> int:
    """Capacity may have changed: try the oldest queued jobs, up to limit, on a fresh view;
    return how many were placed."""
    jobs = list(Job.objects.filter(state=Job.State.QUEUED).order_by("created_at")[:limit])
    return engine().run_pass(jobs) if jobs else 0


def queued_job_ids(*, limit: int) -> list:
    return list(Job.objects.filter(state=Job.State.QUEUED).order_by("created_at").values_list("id", flat=True)[:limit])
