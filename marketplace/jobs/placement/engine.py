"""The engine: one worker's decisions over its capacity view. For each job it finds the groups
of units whose profile admits it, ranks what each could give (the job's preference, then the
packing policy), and hands the decisions to the claim; it never writes itself."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone

from marketplace.accounts.selectors import renter_verified
from marketplace.jobs import ports
from marketplace.jobs.models import Allocation, Job
from marketplace.jobs.placement import claim, record
from marketplace.jobs.placement.rules import (
    Choice,
    Profile,
    UnitState,
    _by_shape,
    choose,
    profile_rejection,
    signature,
    slices_for,
)
from marketplace.jobs.placement.view import CHOICE_CACHE_SIZE, CapacityView, Group
from marketplace.kernel import metrics
from marketplace.kernel.money import run_cost_micros
from nodes.models import Isolation

# How long a signature that found nothing is believed, even if no capacity changed (windows open).
NOTHING_FOUND_TTL_S = 30.0

# An on-demand job that stopped interruptible jobs waits this long for their agents to free the
# GPUs before it may stop others.
PREEMPTION_WAIT_S = 120.0


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
            allocations, lost, preempting = claim.claim(self, decisions, before) if decisions else ([], [], [])
            for decision in preempting:
                pending[decision.job.pk] = (decision.job, decision.summary)
            claim.pending_record(pending.values())
        except DatabaseError:
            # The transaction is lost (say, a deadlock with another writer): so are this batch's
            # tentative leases in the view.
            for unit_id in before:
                self.view.forget(unit_id)
            raise
        metrics.PLACEMENT_LOST_RACES.inc(len(lost))
        if allocations:
            transaction.on_commit(partial(metrics.PLACEMENTS.inc, len(allocations)))
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
        claim.pending_record(notes)

    def _excluded(self, job: Job) -> dict[UUID, str]:
        """Units this job must not go to now, and why."""
        now = time.monotonic()
        self.unresponsive = {unit_id: until for unit_id, until in self.unresponsive.items() if until > now}
        excluded = dict.fromkeys(self.unresponsive, "unit_unresponsive")
        if job.refusals:
            excluded.update(dict.fromkeys(record.units_that_refused(job, now=timezone.now()), "unit_refused"))
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


def _preemption_waited_for(job: Job) -> dict | None:
    """The interruptible jobs this job is waiting on to stop, while that is worth waiting for."""
    waiting = (job.pending_reason or {}).get("preempting")
    if not waiting:
        return None
    since = datetime.fromisoformat(waiting["since"])
    return waiting if (timezone.now() - since).total_seconds() < PREEMPTION_WAIT_S else None
