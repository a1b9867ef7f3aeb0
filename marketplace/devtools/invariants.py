"""The marketplace's data invariants, checked in SQL on any database the stack ran on.

Used by the chaos suite (on its own PostgreSQL, through a psycopg cursor) and by the demo soak
(on the demo's SQLite, through Django's cursor), so both judge a run by the same rules. Every
check returns a list of violations (empty when the invariant holds), each a short text naming
the rows at fault.

The rules:
- ``double_lease``: no slice is ever held by two allocations whose lives overlap.
- ``duplicate_usage_seq``: an allocation's usage sequence numbers are unique.
- ``unbalanced_transaction``: every ledger transaction's legs sum to zero.
- ``billing``: each settled allocation's usage charges equal its billable GPU time (before
  its stop notice and its release) times its locked price, rounded down to a micro-unit.
- ``implausible_usage``: no allocation has billable GPU time beyond its GPUs times its life,
  plus the tolerance an agent is allowed.
- ``wallet``: each renter's wallet equals its credits minus the charges its usage samples
  call for, so a wallet can be checked against samples, not only against its own entries.
- ``job_allocation_mismatch``: a final or queued job holds no allocation; an active one holds one.
- ``stranded_job``: (at the end of a run) every job a client was told it submitted is final,
  or queued with a reason.
"""

import uuid
from collections import defaultdict
from datetime import UTC, datetime

from django.conf import settings

from billing.models import Account, LedgerEntry, LedgerTransaction
from marketplace.jobs.models import Allocation, Job, Lease, UsageHour, UsageSample
from marketplace.kernel.money import usage_cost_micros

LEASE, ALLOCATION, JOB = Lease._meta.db_table, Allocation._meta.db_table, Job._meta.db_table
HOUR = UsageHour._meta.db_table
SAMPLE, TXN, ENTRY, ACCOUNT = (
    UsageSample._meta.db_table, LedgerTransaction._meta.db_table, LedgerEntry._meta.db_table, Account._meta.db_table,
)  # fmt: skip


def _rows(cursor, sql: str, params=()) -> list[tuple]:
    cursor.execute(sql, params)
    return list(cursor.fetchall())


def double_lease(cursor) -> list[str]:
    """Two leases of one slice whose allocations' lives overlap (a lease ends at its release)."""
    sql = f"""
        SELECT a.slice_id, a.allocation_id, b.allocation_id
        FROM {LEASE} a JOIN {LEASE} b ON a.slice_id = b.slice_id AND a.id < b.id
        JOIN {ALLOCATION} aa ON aa.id = a.allocation_id
        JOIN {ALLOCATION} ba ON ba.id = b.allocation_id
        WHERE (b.released_at IS NULL OR aa.created_at < b.released_at)
          AND (a.released_at IS NULL OR ba.created_at < a.released_at)
    """  # noqa: S608 - table names come from the models
    return [f"slice {s} leased to {_id(x)} and {_id(y)} at once" for s, x, y in _rows(cursor, sql)]


def _id(value) -> str:
    """A UUID column's value as text: PostgreSQL gives UUIDs, SQLite 32 hex digits."""
    return str(uuid.UUID(str(value)))


def _when(value) -> datetime | None:
    """A timestamp column's value, aware: SQLite gives naive UTC (or text), PostgreSQL aware."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def duplicate_usage_seq(cursor) -> list[str]:
    sql = f"SELECT allocation_id, seq, COUNT(*) FROM {SAMPLE} GROUP BY allocation_id, seq HAVING COUNT(*) > 1"  # noqa: S608
    return [f"allocation {_id(a)} has seq {s} {n} times" for a, s, n in _rows(cursor, sql)]


def unbalanced_transaction(cursor) -> list[str]:
    sql = f"""
        SELECT t.key, COALESCE(SUM(e.amount_micros), 0) FROM {TXN} t LEFT JOIN {ENTRY} e ON e.transaction_id = t.id
        GROUP BY t.id, t.key HAVING COALESCE(SUM(e.amount_micros), 0) <> 0 OR COUNT(e.id) = 0
    """  # noqa: S608
    return [f"transaction {key} sums to {total}" for key, total in _rows(cursor, sql)]


def _billable_ms(cursor) -> dict[str, int]:
    """Billable GPU-ms per allocation: samples recorded before its stop notice and its release,
    or, once rolled up, its hours' billable GPU-ms."""
    sql = f"""
        SELECT s.allocation_id, SUM(s.gpu_ms) FROM {SAMPLE} s JOIN {ALLOCATION} a ON a.id = s.allocation_id
        WHERE (a.preempted_at IS NULL OR s.recorded_at <= a.preempted_at)
          AND (a.released_at IS NULL OR s.recorded_at <= a.released_at)
          AND a.usage_rolled_up_at IS NULL
        GROUP BY s.allocation_id
        UNION ALL
        SELECT allocation_id, SUM(billable_gpu_ms) FROM {HOUR} GROUP BY allocation_id
    """  # noqa: S608
    return {_id(a): int(ms) for a, ms in _rows(cursor, sql)}


def _charged(cursor) -> dict[str, int]:
    """What each allocation's usage postings took from the renter's wallet (positive)."""
    sql = f"""
        SELECT t.allocation_id, -SUM(e.amount_micros) FROM {TXN} t
        JOIN {ENTRY} e ON e.transaction_id = t.id JOIN {ACCOUNT} c ON c.id = e.account_id
        WHERE t.kind = 'usage' AND c.kind = %s GROUP BY t.allocation_id
    """  # noqa: S608
    return {_id(a): int(m) for a, m in _rows(cursor, sql, (Account.Kind.RENTER_WALLET,))}


def _allocations(cursor) -> list[tuple]:
    sql = f"""
        SELECT a.id, a.price_per_gpu_hour_micros, a.gpu_count, a.created_at, a.released_at, j.renter_id
        FROM {ALLOCATION} a JOIN {JOB} j ON j.id = a.job_id
    """  # noqa: S608
    return [
        (_id(pk), price, gpus, _when(created), _when(released), renter)
        for pk, price, gpus, created, released, renter in _rows(cursor, sql)
    ]


def _expected(cursor, allocations: list[tuple]) -> dict[str, tuple[int, object]]:
    """Each allocation's expected charge from its samples, with its renter."""
    used = _billable_ms(cursor)
    return {
        pk: (usage_cost_micros(gpu_ms=used.get(pk, 0), price_per_gpu_hour_micros=price), renter)
        for pk, price, _, _, _, renter in allocations
    }


def billing(cursor, *, settled_only: bool = True) -> list[str]:
    """Charges equal billable time x locked price, for released allocations (running ones are
    charged by the rating sweep as it goes) or for all when ``settled_only`` is off."""
    charged, allocations = _charged(cursor), _allocations(cursor)
    released = {pk for pk, _, _, _, released_at, _ in allocations if released_at is not None}
    wrong = []
    for pk, (due, _) in _expected(cursor, allocations).items():
        if (not settled_only or pk in released) and charged.get(pk, 0) != due:
            wrong.append(f"allocation {pk} charged {charged.get(pk, 0)} for usage worth {due}")
    return wrong


def implausible_usage(cursor, *, now: datetime) -> list[str]:
    used = _billable_ms(cursor)
    slack_s = settings.USAGE_TOLERANCE_S + settings.USAGE_CLOCK_SKEW_S
    wrong = []
    for pk, _, gpus, created_at, released_at, _ in _allocations(cursor):
        life_s = ((released_at or now) - created_at).total_seconds()
        if used.get(pk, 0) > gpus * (life_s + slack_s) * 1000:
            wrong.append(f"allocation {pk} billed {used[pk]} GPU-ms in {life_s:.0f} s on {gpus} GPUs")
    return wrong


def wallet(cursor) -> list[str]:
    """Balance = non-usage entries (credits, refunds) - what the renter's samples cost."""
    sql = f"""
        SELECT c.user_id, t.kind = 'usage', SUM(e.amount_micros) FROM {ENTRY} e
        JOIN {ACCOUNT} c ON c.id = e.account_id JOIN {TXN} t ON t.id = e.transaction_id
        WHERE c.kind = %s GROUP BY c.user_id, t.kind = 'usage'
    """  # noqa: S608
    balance, credits = defaultdict(int), defaultdict(int)
    for user, is_usage, total in _rows(cursor, sql, (Account.Kind.RENTER_WALLET,)):
        balance[user] += int(total)
        if not is_usage:
            credits[user] += int(total)
    cost = defaultdict(int)
    for due, renter in _expected(cursor, _allocations(cursor)).values():
        cost[renter] += due
    return [
        f"renter {user}: wallet {balance[user]} but credits {credits[user]} - usage {cost[user]}"
        for user in set(balance) | set(cost)
        if balance[user] != credits[user] - cost[user]
    ]


def job_allocation_mismatch(cursor) -> list[str]:
    """A job's state and its allocations disagree: a final or queued job still holding an
    allocation, or a placed, starting or running job holding none (each read in one statement)."""
    active = tuple(str(state) for state in Job.ACTIVE_STATES)
    marks = ", ".join(["%s"] * len(active))
    holding = f"""
        SELECT j.id, j.state FROM {JOB} j JOIN {ALLOCATION} a ON a.job_id = j.id AND a.released_at IS NULL
        WHERE j.state NOT IN ({marks})
    """  # noqa: S608
    bare = f"""
        SELECT j.id, j.state FROM {JOB} j WHERE j.state IN ({marks})
        AND NOT EXISTS (SELECT 1 FROM {ALLOCATION} a WHERE a.job_id = j.id AND a.released_at IS NULL)
    """  # noqa: S608
    return [
        f"job {_id(pk)} is {state} but holds an active allocation" for pk, state in _rows(cursor, holding, active)
    ] + [f"job {_id(pk)} is {state} without an active allocation" for pk, state in _rows(cursor, bare, active)]


def stranded_job(cursor, job_ids) -> list[str]:
    """Jobs neither final nor queued with a reason; ``job_ids`` are the ones clients were told of."""
    wanted = {_id(pk) for pk in job_ids}
    final = {str(state) for state in Job.FINAL_STATES}
    sql = f"SELECT id, state, pending_reason FROM {JOB}"  # noqa: S608
    stranded, seen = [], set()
    for pk, state, reason in _rows(cursor, sql):
        pk = _id(pk)
        if pk not in wanted:
            continue
        seen.add(pk)
        has_reason = bool(reason) and reason != "{}"  # SQLite gives the JSON as text
        if state not in final and not (state == Job.State.QUEUED and has_reason):
            stranded.append(f"job {pk} is {state}")
    stranded += [f"job {pk} was acknowledged but is not stored" for pk in sorted(wanted - seen)]
    return stranded


def check(cursor, *, now: datetime, job_ids=None, settled: bool = True) -> dict[str, list[str]]:
    """Every invariant; ``settled`` when the run has ended and postings have caught up."""
    found = {
        "double_lease": double_lease(cursor),
        "duplicate_usage_seq": duplicate_usage_seq(cursor),
        "unbalanced_transaction": unbalanced_transaction(cursor),
        "implausible_usage": implausible_usage(cursor, now=now),
        "job_allocation_mismatch": job_allocation_mismatch(cursor),
    }
    if settled:
        found["billing"] = billing(cursor)
        found["wallet"] = wallet(cursor)
        if job_ids is not None:
            found["stranded_job"] = stranded_job(cursor, job_ids)
    return found
