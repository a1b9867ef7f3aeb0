"""Usage samples: GPU time an agent measured for one of its allocations.

Samples belong to jobs (they measure allocations); billing rates them into the ledger, told
through ``ports.usage_due`` when an allocation's usage should be posted at once.

Only plausible usage is stored, so only plausible usage is ever billed. A batch is taken while
the allocation is active, or for USAGE_LATE_GRACE_S after its release (reports the agent
buffered); each new sample's ``recorded_at`` lies in the allocation's life, give or take
USAGE_CLOCK_SKEW_S; and all its samples together come to at most its GPUs x the time it has
been active (from its creation to its release, or now), plus USAGE_TOLERANCE_S seconds of each
GPU. A batch that breaks a rule is refused whole (the agent drops it), audited against the unit
as ``unit.usage_refused``, and the implausible ones count towards putting the unit under review.
Samples already stored are duplicates, whenever they come again.
"""

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from marketplace.jobs import ports
from marketplace.jobs.models import Allocation, UsageSample
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import DomainError
from nodes.services import unit_implausible_report

# Samples per INSERT: five parameters a row stays well under SQLite's 32,766 and PostgreSQL's 65,535.
INSERT_ROWS = 1000


@dataclass(frozen=True)
class SampleReport:
    seq: int
    gpu_ms: int
    recorded_at: datetime


# The samples a renter pays for, as a filter on UsageSample: those recorded up to the allocation's
# stop notice, if the platform gave one (a preemption, a residency breach: the time after is not
# the renter's doing), and up to its release, if it was released (a unit gone offline, a job
# reported lost: the renter is told it stopped then). Buffered samples of time before either are
# paid for whenever they arrive. Billing, statements and meter events all rate through this.
BILLABLE = (Q(allocation__preempted_at__isnull=True) | Q(recorded_at__lte=F("allocation__preempted_at"))) & (
    Q(allocation__released_at__isnull=True) | Q(recorded_at__lte=F("allocation__released_at"))
)
# The samples still read as samples: those of allocations not rolled up into UsageHour rows
# (marketplace/jobs/retention.py). A rolled-up allocation's usage is its hours' ``billable_gpu_ms``;
# its samples may linger until their partition goes, and must not count twice.
NOT_ROLLED_UP = Q(allocation__usage_rolled_up_at__isnull=True)


@dataclass(frozen=True)
class Rule:
    """A usage rule, named by its problem type. ``implausible``: no honest agent breaks it; the
    others an honest agent can meet after an outage long enough for the server to give up on
    its job, so they refuse the usage without counting against the unit."""

    code: str
    status: int
    implausible: bool


ALLOCATION_ENDED = Rule("usage-allocation-ended", 409, implausible=False)
AFTER_RELEASE = Rule("usage-after-release", 409, implausible=False)
OUTSIDE_ALLOCATION = Rule("usage-recorded-outside-allocation", 422, implausible=True)
EXCEEDS_GPU_TIME = Rule("usage-exceeds-gpu-time", 422, implausible=True)


class UsageRefused(DomainError):
    title = "Usage refused"

    def __init__(self, rule: Rule, detail: str) -> None:
        super().__init__(detail)
        self.rule, self.code, self.status = rule, rule.code, rule.status


def usage_record(*, allocation: Allocation, samples: list[SampleReport]) -> tuple[int, int]:
    """Store the agent's samples if they are plausible (see the module), else raise UsageRefused
    and store none. A (allocation, seq) already stored, or repeated within the batch (the first
    one counts), is a duplicate and ignored. Returns (accepted, duplicates)."""
    now = timezone.now()
    with transaction.atomic():
        # Locked so that concurrent batches of one allocation are checked one after the other,
        # each against what the one before it stored.
        current = Allocation.objects.select_for_update().get(pk=allocation.pk)
        # The allocation's start names the one partition its samples are in (PostgreSQL).
        stored = UsageSample.objects.filter(
            allocation=current, allocation_started_at=current.created_at, seq__in={sample.seq for sample in samples}
        )
        known = set(stored.values_list("seq", flat=True))
        new = _new_samples(samples, known)
        refusal = _refusal(current, new, now) if new else None
        if refusal is None:
            accepted = len(_samples_insert([(current, sample) for sample in new]))
    if refusal is not None:
        _refused(current, refusal, samples=len(new), now=now)
        raise refusal
    if accepted and settings.USAGE_POSTING_INTERVAL_S <= 0:
        ports.usage_due(allocation.pk)  # otherwise the rating sweep posts it within the interval
    return accepted, len(samples) - accepted


def _new_samples(samples: list[SampleReport], known: set[int]) -> list[SampleReport]:
    """The samples whose seq is not stored already (``known``), each seq once: the first of a
    batch that repeats one counts."""
    unique = {sample.seq: sample for sample in reversed(samples)}
    return [sample for seq, sample in unique.items() if seq not in known]


def _refusal(
    allocation: Allocation, new: list[SampleReport], now: datetime, before: int | None = None
) -> UsageRefused | None:
    """The first rule the new samples break, or None. ``before``: the GPU-ms already stored for
    the allocation, if the caller has read it."""
    released = allocation.released_at
    skew = timedelta(seconds=settings.USAGE_CLOCK_SKEW_S)
    if released is not None and now > released + timedelta(seconds=settings.USAGE_LATE_GRACE_S):
        detail = (
            f"The allocation was released at {released.isoformat()}; usage is taken up to "
            f"{settings.USAGE_LATE_GRACE_S} s after its release."
        )
        return UsageRefused(ALLOCATION_ENDED, detail)
    earliest, latest = allocation.created_at - skew, now + skew
    for sample in new:
        if not earliest <= sample.recorded_at <= latest:
            detail = (
                f"Sample {sample.seq} was recorded at {sample.recorded_at.isoformat()}, outside the allocation's "
                f"life ({earliest.isoformat()} to {latest.isoformat()}, allowing {settings.USAGE_CLOCK_SKEW_S} s "
                "of clock skew)."
            )
            return UsageRefused(OUTSIDE_ALLOCATION, detail)
        if released is not None and sample.recorded_at > released + skew:
            detail = (
                f"Sample {sample.seq} was recorded at {sample.recorded_at.isoformat()}, after the allocation's "
                f"release at {released.isoformat()}."
            )
            return UsageRefused(AFTER_RELEASE, detail)
    active_ms = max(0, round(((released or now) - allocation.created_at).total_seconds() * 1000))
    allowed = allocation.gpu_count * (active_ms + settings.USAGE_TOLERANCE_S * 1000)
    if before is None:
        mine = UsageSample.objects.filter(allocation=allocation, allocation_started_at=allocation.created_at)
        before = mine.aggregate(total=Sum("gpu_ms"))["total"] or 0
    total = before + sum(sample.gpu_ms for sample in new)
    if total > allowed:
        detail = (
            f"{total} GPU-ms in all is more than the allocation's {allocation.gpu_count} GPU(s) for the "
            f"{active_ms} ms it has been active allow ({allowed} GPU-ms, with {settings.USAGE_TOLERANCE_S} s of "
            "tolerance per GPU)."
        )
        return UsageRefused(EXCEEDS_GPU_TIME, detail)
    return None


@transaction.atomic
def _refused(allocation: Allocation, refusal: UsageRefused, *, samples: int, now: datetime) -> None:
    """Audit the refusal against the unit; count an implausible one towards its review."""
    audit_record(
        "unit.usage_refused", allocation.unit_id, actor=f"unit:{allocation.unit_id}", rule=refusal.code,
        allocation=str(allocation.pk), job=str(allocation.job_id), samples=samples, detail=refusal.detail,
    )  # fmt: skip
    if refusal.rule.implausible:
        unit_implausible_report(unit_id=allocation.unit_id, reason=refusal.code, now=now)


# Table and columns are fixed by the model; only the VALUES placeholders vary with the batch.
# No conflict target: the unique constraint is (allocation, seq) on SQLite and (allocation, seq,
# allocation_started_at) on partitioned PostgreSQL (marketplace/jobs/partitions.py), the same rule.
SAMPLES_INSERT = (
    "INSERT INTO {table} (allocation_id, seq, gpu_ms, recorded_at, received_at, allocation_started_at) "
    "VALUES {rows} ON CONFLICT DO NOTHING RETURNING allocation_id, seq"
)


def _samples_insert(rows: list[tuple[Allocation, SampleReport]]) -> set[tuple[uuid.UUID, int]]:
    """Insert (allocation, sample) rows, INSERT_ROWS to a statement, skipping (allocation, seq)
    pairs already stored; returns the pairs that were new. RETURNING lists only the rows the
    statement inserted (PostgreSQL, SQLite >= 3.35), so the count stays exact even if the same
    samples were stored meanwhile. Each row carries its allocation's start, the partition key."""
    prep = connection.ops.adapt_datetimefield_value
    field = UsageSample._meta.get_field("allocation")
    received_at = prep(timezone.now())
    inserted = set()
    for start in range(0, len(rows), INSERT_ROWS):
        chunk, params = rows[start : start + INSERT_ROWS], []
        for allocation, sample in chunk:
            params += [field.get_db_prep_save(allocation.pk, connection), sample.seq, sample.gpu_ms,
                       prep(sample.recorded_at), received_at, prep(allocation.created_at)]  # fmt: skip
        values = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(chunk))
        with connection.cursor() as cursor:
            cursor.execute(SAMPLES_INSERT.format(table=UsageSample._meta.db_table, rows=values), params)
            inserted.update((_uuid(allocation_id), seq) for allocation_id, seq in cursor.fetchall())
    return inserted


def _uuid(value) -> uuid.UUID:
    """A UUID as the database returns it: a UUID (PostgreSQL) or its hex (SQLite)."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


@dataclass(frozen=True)
class UsageReport:
    """One agent call's batch of samples, for ``usage_record_many``."""

    unit_id: uuid.UUID | None  # None: no unit's (its allocation is of none)
    allocation_id: uuid.UUID
    samples: list[SampleReport]


def usage_record_many(reports: list[UsageReport]) -> list[tuple[int, int] | None]:
    """Store the batches of many agent calls in one transaction, each as ``usage_record`` would
    have stored it after the ones before it: what the connection servers do with the reports
    that arrive while such a transaction runs, so that a thousand running jobs reporting every
    few seconds cost a few statements a round rather than a few each.

    Returns, for each report, (accepted, duplicates), or None where this takes nothing of it:
    its allocation is not of its unit, or a rule refuses it. The caller makes that one through
    ``usage_record`` (which answers the 404, or refuses, audits and counts the refusal)."""
    now = timezone.now()
    ids = sorted({report.allocation_id for report in reports})
    with transaction.atomic():
        # Locked in one order, so that two such transactions never wait on each other in a cycle.
        allocations = {
            allocation.pk: allocation
            for allocation in Allocation.objects.select_for_update().filter(pk__in=ids).order_by("pk")
        }
        mine = {
            report.allocation_id
            for report in reports
            if (allocation := allocations.get(report.allocation_id)) is not None
            and allocation.unit_id == report.unit_id
        }
        seqs = {sample.seq for report in reports for sample in report.samples}
        # The allocations' starts name the partitions their samples are in (PostgreSQL).
        stored = UsageSample.objects.filter(
            allocation_id__in=mine, allocation_started_at__in={allocations[pk].created_at for pk in mine}
        )
        known: defaultdict[uuid.UUID, set[int]] = defaultdict(set)
        for allocation_id, seq in stored.filter(seq__in=seqs).values_list("allocation_id", "seq"):
            known[allocation_id].add(seq)
        totals = defaultdict(int, stored.values("allocation_id").annotate(total=Sum("gpu_ms"))
                             .values_list("allocation_id", "total"))  # fmt: skip
        taken: list[list[SampleReport] | None] = []
        for report in reports:
            allocation = allocations.get(report.allocation_id)
            if allocation is None or allocation.unit_id != report.unit_id:
                taken.append(None)
                continue
            new = _new_samples(report.samples, known[allocation.pk])
            if new and _refusal(allocation, new, now, before=totals[allocation.pk]) is not None:
                taken.append(None)
                continue
            known[allocation.pk].update(sample.seq for sample in new)
            totals[allocation.pk] += sum(sample.gpu_ms for sample in new)
            taken.append(new)
        inserted = _samples_insert(
            [
                (allocations[report.allocation_id], sample)
                for report, new in zip(reports, taken, strict=True)
                for sample in new or []
            ]
        )
    results = []
    for report, new in zip(reports, taken, strict=True):
        if new is None:
            results.append(None)
            continue
        accepted = sum((report.allocation_id, sample.seq) in inserted for sample in new)
        results.append((accepted, len(report.samples) - accepted))
    if settings.USAGE_POSTING_INTERVAL_S <= 0:  # otherwise the rating sweep posts them within the interval
        for allocation_id in {
            report.allocation_id for report, result in zip(reports, results, strict=True) if result and result[0]
        }:
            ports.usage_due(allocation_id)
    return results
