"""The ledger and rating. ``ledger_post`` is the only writer of ledger rows; usage samples are
recorded by the jobs app (``marketplace.jobs.usage``) and rated here."""

from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.db.models import Q, Sum

from billing.models import Account, LedgerEntry, LedgerTransaction
from marketplace.jobs.models import Allocation, UsageSample
from marketplace.jobs.selectors import allocation_usage, allocations_with_usage
from marketplace.kernel.audit import audit_records
from marketplace.kernel.money import usage_cost_micros
from marketplace.kernel.tasks import publish_on_commit


class UnbalancedTransaction(ValueError):
    pass


def account_for(kind: str, user=None) -> Account:
    account, _ = Account.objects.get_or_create(kind=kind, user=user, currency=settings.CURRENCY)
    return account


def _accounts(*wanted: tuple[str, object]) -> list[Account]:
    """The accounts for (kind, user id) pairs, read in one query; any missing is created."""
    match = Q()
    for kind, user_id in wanted:
        match |= Q(kind=kind, user_id=user_id) if user_id is not None else Q(kind=kind, user__isnull=True)
    found = {(a.kind, a.user_id): a for a in Account.objects.filter(match, currency=settings.CURRENCY)}
    return [
        found.get((kind, user_id))
        or Account.objects.get_or_create(kind=kind, user_id=user_id, currency=settings.CURRENCY)[0]
        for kind, user_id in wanted
    ]


@dataclass(frozen=True)
class Posting:
    """One balanced transaction to write: its legs (account, micro-units) sum to zero."""

    key: str
    kind: str
    legs: list[tuple[Account, int]]
    allocation_id: object = None
    job_id: object = None  # the audit row's subject when the posting is for an allocation
    memo: str = ""


def _balanced(postings: list[Posting]) -> None:
    for posting in postings:
        total = sum(amount for _, amount in posting.legs)
        if total != 0:
            raise UnbalancedTransaction(f"Legs of {posting.key} sum to {total}, not zero.")


def ledger_post_many(postings: list[Posting]) -> list[LedgerTransaction]:
    """The one writer of ledger rows, for one posting or many: every posting's legs must sum to
    zero (nothing is written otherwise), then the transactions, their entries and an audit row
    each are written in three bulk inserts. Keys are unique in the database, so a key posted
    already fails the whole batch; ``ledger_post`` looks a single key up first."""
    _balanced(postings)
    # No savepoint inside a caller's transaction (two round trips per posting): any error here
    # is the caller's error too.
    with transaction.atomic(savepoint=False):
        txns = LedgerTransaction.objects.bulk_create(
            [LedgerTransaction(key=p.key, kind=p.kind, allocation_id=p.allocation_id, memo=p.memo) for p in postings]
        )
        LedgerEntry.objects.bulk_create(
            [
                LedgerEntry(transaction=txn, account=account, amount_micros=amount)
                for txn, posting in zip(txns, postings, strict=True)
                for account, amount in posting.legs
                if amount
            ]
        )
        audit_records(
            (f"ledger.{p.kind}_posted", p.job_id or txn.pk, {"key": p.key})
            for txn, p in zip(txns, postings, strict=True)
        )
    return txns


def ledger_post(
    *, key: str, kind: str, legs: list[tuple[Account, int]], allocation=None, memo: str = ""
) -> LedgerTransaction:
    """Post one balanced transaction, once per key: a repeated key returns the first posting."""
    posting = Posting(
        key=key,
        kind=kind,
        legs=legs,
        allocation_id=allocation.pk if allocation else None,
        job_id=allocation.job_id if allocation else None,
        memo=memo,
    )
    _balanced([posting])  # before any query, so a refused posting leaves the caller's transaction usable
    with transaction.atomic(savepoint=False):
        existing = LedgerTransaction.objects.filter(key=key).first()
        if existing is not None:
            return existing
        return ledger_post_many([posting])[0]


def account_balance(account: Account) -> int:
    return account.entries.aggregate(total=Sum("amount_micros"))["total"] or 0


def usage_post_request(allocation_id) -> None:
    """Ask for the allocation's usage to be posted now (its job ended); running jobs' usage is
    posted by the rating sweep every USAGE_POSTING_INTERVAL_S."""
    from billing import tasks

    publish_on_commit(tasks.usage_post, str(allocation_id))


@transaction.atomic
def usage_post(*, allocation_id) -> LedgerTransaction | None:
    """Charge the renter for usage recorded but not yet charged.

    The charge is always (cost of all usage so far) - (already charged), so duplicated,
    reordered or late samples can never change the total; the allocation row lock serialises
    concurrent postings for the same allocation.
    """
    # Only the allocation row is locked (the job and unit are read, not changed), so a posting
    # never holds a unit that placement or a heartbeat wants. The totals are read in a statement
    # after the lock is granted: under READ COMMITTED that one sees the posting we waited for.
    allocation = Allocation.objects.select_for_update(of=("self",)).select_related("job", "unit").get(pk=allocation_id)
    used_ms, charged = allocation_usage(allocation)
    due = usage_cost_micros(gpu_ms=used_ms, price_per_gpu_hour_micros=allocation.price_per_gpu_hour_micros)
    delta = due - charged
    if delta <= 0:
        return None
    fee = delta * settings.PLATFORM_FEE_PERCENT // 100
    wallet, payable, fees = _accounts(
        (Account.Kind.RENTER_WALLET, allocation.job.renter_id),
        (Account.Kind.OWNER_PAYABLE, allocation.unit.owner_id),
        (Account.Kind.PLATFORM_FEES, None),
    )
    legs = [(wallet, -delta), (payable, delta - fee), (fees, fee)]
    return ledger_post(
        key=f"usage:{allocation.pk}:{used_ms}",
        kind="usage",
        legs=legs,
        allocation=allocation,
        memo=f"{used_ms} GPU-ms at {allocation.price_per_gpu_hour_micros} micros/GPU-hour",
    )


@transaction.atomic
def usage_rate(allocation_ids) -> list[LedgerTransaction]:
    """Post the usage not yet charged of many allocations at once, as ``usage_post`` does for
    one: the allocations are locked in key order in one statement, their totals read in one
    statement after the locks are granted, and the postings written by ``ledger_post_many``."""
    ids = sorted(set(allocation_ids))
    locked = Allocation.objects.select_for_update(of=("self",)).filter(pk__in=ids).order_by("pk")
    list(locked.values_list("pk", flat=True))
    rows = allocations_with_usage(Allocation.objects.filter(pk__in=ids)).values_list(
        "pk", "job_id", "price_per_gpu_hour_micros", "job__renter_id", "unit__owner_id", "usage_gpu_ms",
        "usage_wallet_micros",
    )  # fmt: skip
    due = []
    for pk, job_id, price, renter_id, owner_id, used_ms, wallet_micros in rows:
        delta = usage_cost_micros(gpu_ms=used_ms, price_per_gpu_hour_micros=price) + wallet_micros
        if delta > 0:
            due.append((pk, job_id, price, renter_id, owner_id, used_ms, delta))
    if not due:
        return []
    wanted = {(Account.Kind.PLATFORM_FEES, None)}
    for _, _, _, renter_id, owner_id, _, _ in due:
        wanted |= {(Account.Kind.RENTER_WALLET, renter_id), (Account.Kind.OWNER_PAYABLE, owner_id)}
    accounts = {(a.kind, a.user_id): a for a in _accounts(*wanted)}
    postings = []
    for pk, job_id, price, renter_id, owner_id, used_ms, delta in due:
        fee = delta * settings.PLATFORM_FEE_PERCENT // 100
        legs = [
            (accounts[Account.Kind.RENTER_WALLET, renter_id], -delta),
            (accounts[Account.Kind.OWNER_PAYABLE, owner_id], delta - fee),
            (accounts[Account.Kind.PLATFORM_FEES, None], fee),
        ]
        memo = f"{used_ms} GPU-ms at {price} micros/GPU-hour"
        postings.append(Posting(f"usage:{pk}:{used_ms}", "usage", legs, pk, job_id, memo))
    return ledger_post_many(postings)


def usage_rate_since(since: datetime, *, chunk: int = 500) -> tuple[list[LedgerTransaction], set]:
    """Rate every allocation that received samples since then; returns the postings and the
    renters charged. Rating is idempotent, so overlapping windows cost only a re-read."""
    ids = list(
        UsageSample.objects.filter(received_at__gte=since).order_by().values_list("allocation_id", flat=True).distinct()
    )
    postings = []
    for start in range(0, len(ids), chunk):
        postings += usage_rate(ids[start : start + chunk])
    if not postings:
        return [], set()
    charged = Allocation.objects.filter(pk__in=[txn.allocation_id for txn in postings])
    renters = set(charged.values_list("job__renter_id", flat=True))
    return postings, renters


@transaction.atomic
def wallet_credit_promotional(*, user, amount_micros: int, key: str) -> LedgerTransaction:
    """Credit a renter's wallet from platform funds (demo and goodwill credit)."""
    return ledger_post(
        key=key,
        kind="promotion",
        legs=[
            (account_for(Account.Kind.RENTER_WALLET, user), amount_micros),
            (account_for(Account.Kind.PLATFORM_LOSSES), -amount_micros),
        ],
        memo="promotional credit",
    )
