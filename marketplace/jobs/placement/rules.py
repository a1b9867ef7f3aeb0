"""The matching rules: does a unit (its profile and free slices, as the capacity view holds
them) suit a job, and what would the job take there. Pure functions over plain values: no
queries, no writes, so they are tested without a database (tests/jobs/test_placement_rules.py).

A job is judged on a unit's profile first (location, state, owner's policy), then slice by slice
(model, VRAM, CUDA, isolation, price, share); ``choose`` picks the GPUs that keep the unit least
fragmented under the packing policy."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple
from uuid import UUID

from marketplace.jobs import jurisdictions, packing
from marketplace.jobs.models import Job
from nodes import availability
from nodes.models import Isolation, RentersAccepted, Unit, interruptible_price

if TYPE_CHECKING:
    from marketplace.jobs.placement.engine import Pass


class Profile(NamedTuple):
    """Everything about a unit a job's or owner's rules look at, apart from its free slices.

    Named tuples rather than dataclasses: the view hashes, compares and sorts these by the
    hundred thousand, and a tuple does that in C."""

    status: str
    country: str
    subdivision: str
    verified: bool
    subdivision_attested: bool  # an operator vouched for the declared subdivision, not just the country
    disputed: bool  # evidence puts the unit in another country than it declares (nodes.services.location_disputed)
    isolation_levels: tuple[str, ...]
    workload_classes: tuple[str, ...]
    renters_accepted: str
    interruptible_price_percent: int
    max_job_duration_s: int | None
    availability: tuple
    time_zone: str
    reliability: float  # rounded, so units of nearly equal standing group together
    under_review: bool = False  # staff are to look at its agent's implausible reports
    agent_country: str = ""  # the country its agent is configured for, if it says


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


def _free_ids(state: UnitState) -> set:
    return {slice_id for slices in state.free.values() for slice_id, _ in slices}


def _preemptible_ids(state: UnitState) -> set:
    return {held[0] for slices in state.preemptible.values() for held in slices}


def _by_shape(free_slice: tuple[UUID, SliceShape]) -> tuple:
    slice_id, shape = free_slice
    return shape, slice_id.int


def _task(gpu_count: int, milli: int) -> packing.Task:
    return packing.Task(cpu_milli=0, num_gpu=gpu_count, gpu_milli=min(milli, packing.MILLI))


def profile_rejection(job: Job, profile: Profile, run: Pass) -> str | None:
    """Why the unit's location, state or the owner's policy rule the job out, or None."""
    if profile.status in (Unit.Status.SUSPECT, Unit.Status.OFFLINE):
        return "unit_offline"
    if profile.status == Unit.Status.DRAINING:
        return "unit_draining"
    if profile.under_review:
        return "unit_under_review"
    location = location_rejection(job, profile)
    if location is not None:
        return location
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


class Location(NamedTuple):
    """Where a unit is, as far as a job's residency rules look: the part of a ``Profile`` that
    ``location_rejection`` reads, built from a unit row when a running job is checked again."""

    country: str
    subdivision: str
    verified: bool
    subdivision_attested: bool
    disputed: bool
    agent_country: str


def location_rejection(job: Job, where: Location | Profile) -> str | None:
    """Why the unit's location rules the job out, or None: the one residency check, made when a
    job is placed and again whenever the unit's location changes while it runs."""
    if not job.jurisdictions and not job.require_verified_location:
        return None
    matched = jurisdictions.match(job.jurisdictions, where.country, where.subdivision) if job.jurisdictions else ""
    if matched is None:
        return "jurisdiction"
    if job.jurisdictions and where.disputed:
        return "location_disputed"
    if job.jurisdictions and where.agent_country and where.agent_country != where.country:
        return "agent_country"  # its agent would refuse the job, or it is not where it says
    if job.require_verified_location and not _location_proven(job, where, matched):
        return "location_unverified"
    return None


def _location_proven(job: Job, profile: Location | Profile, matched: str) -> bool:
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
