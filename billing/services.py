"""The ledger and metering. ``ledger_post`` is the only writer of ledger rows."""

from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Sum

from billing.models import Account, LedgerEntry, LedgerTransaction, UsageSample
from billing.selectors import allocations_with_usage
from marketplace.audit import audit_record
from marketplace.models import Allocation

MS_PER_HOUR = 3_600_000


class UnbalancedTransaction(ValueError):
    pass


@dataclass(frozen=True)
class SampleReport:
    seq: int
    gpu_ms: int
    recorded_at: datetime


def account_for(kind: str, user=None) -> Account:
    account, _ = Account.objects.get_or_create(kind=kind, user=user, currency=settings.CURRENCY)
    return account


@transaction.atomic
def ledger_post(
    *, key: str, kind: str, legs: list[tuple[Account, int]], allocation=None, memo: str = ""
) -> LedgerTransaction:
    """Post one balanced transaction, once per key: a repeated key returns the first posting."""
    if sum(amount for _, amount in legs) != 0:
        raise UnbalancedTransaction(f"Legs of {key} sum to {sum(a for _, a in legs)}, not zero.")
    existing = LedgerTransaction.objects.filter(key=key).first()
    if existing is not None:
        return existing
    txn = LedgerTransaction.objects.create(key=key, kind=kind, allocation=allocation, memo=memo)
    LedgerEntry.objects.bulk_create(
        [LedgerEntry(transaction=txn, account=account, amount_micros=amount) for account, amount in legs if amount]
    )
    audit_record(f"ledger.{kind}_posted", allocation.job_id if allocation else txn.pk, key=key)
    return txn


def account_balance(account: Account) -> int:
    return account.entries.aggregate(total=Sum("amount_micros"))["total"] or 0


def usage_record(*, allocation: Allocation, samples: list[SampleReport]) -> tuple[int, int]:
    """Store the agent's samples; a (allocation, seq) already stored is a duplicate and ignored."""
    seen = set(
        UsageSample.objects.filter(allocation=allocation, seq__in=[s.seq for s in samples]).values_list(
            "seq", flat=True
        )
    )
    accepted = 0
    for sample in samples:
        if sample.seq in seen:
            continue
        try:
            with transaction.atomic():
                UsageSample.objects.create(
                    allocation=allocation, seq=sample.seq, gpu_ms=sample.gpu_ms, recorded_at=sample.recorded_at
                )
        except IntegrityError:
            continue  # the same sample arrived concurrently
        seen.add(sample.seq)
        accepted += 1
    if accepted:
        usage_post_request(allocation.pk)
    return accepted, len(samples) - accepted


def usage_post_request(allocation_id) -> None:
    from billing import tasks

    transaction.on_commit(lambda: tasks.usage_post.delay(str(allocation_id)))


def usage_cost_micros(*, gpu_ms: int, price_per_gpu_hour_micros: int) -> int:
    """Cost of GPU time at a price per GPU-hour, rounded down to a whole micro-unit."""
    return gpu_ms * price_per_gpu_hour_micros // MS_PER_HOUR


def allocation_usage(allocation: Allocation) -> tuple[int, int]:
    """(GPU-milliseconds recorded, micro-units charged so far) for one allocation."""
    totals = allocations_with_usage(Allocation.objects.filter(pk=allocation.pk)).values(
        "usage_gpu_ms", "usage_wallet_micros"
    )[0]
    return totals["usage_gpu_ms"], -totals["usage_wallet_micros"]


@transaction.atomic
def usage_post(*, allocation_id) -> LedgerTransaction | None:
    """Charge the renter for usage recorded but not yet charged.

    The charge is always (cost of all usage so far) - (already charged), so duplicated,
    reordered or late samples can never change the total; the allocation row lock serialises
    concurrent postings for the same allocation.
    """
    allocation = Allocation.objects.select_for_update().select_related("job", "unit").get(pk=allocation_id)
    used_ms, charged = allocation_usage(allocation)
    due = usage_cost_micros(gpu_ms=used_ms, price_per_gpu_hour_micros=allocation.price_per_gpu_hour_micros)
    delta = due - charged
    if delta <= 0:
        return None
    fee = delta * settings.PLATFORM_FEE_PERCENT // 100
    legs = [
        (account_for(Account.Kind.RENTER_WALLET, allocation.job.renter), -delta),
        (account_for(Account.Kind.OWNER_PAYABLE, allocation.unit.owner), delta - fee),
        (account_for(Account.Kind.PLATFORM_FEES), fee),
    ]
    return ledger_post(
        key=f"usage:{allocation.pk}:{used_ms}",
        kind="usage",
        legs=legs,
        allocation=allocation,
        memo=f"{used_ms} GPU-ms at {allocation.price_per_gpu_hour_micros} micros/GPU-hour",
    )


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
