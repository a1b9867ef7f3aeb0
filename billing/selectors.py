from django.db.models import BigIntegerField, F, OuterRef, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce

from billing.models import Account, LedgerEntry, UsageSample


def wallet_balance_micros(user) -> int:
    entries = LedgerEntry.objects.filter(account__kind=Account.Kind.RENTER_WALLET, account__user=user)
    return entries.aggregate(total=Sum("amount_micros"))["total"] or 0


def _total(rows: QuerySet, group: str, field: str) -> Coalesce:
    # order_by() drops the model's default ordering, which would otherwise split the GROUP BY.
    total = rows.order_by().values(group).annotate(total=Sum(field)).values("total")
    return Coalesce(Subquery(total), 0, output_field=BigIntegerField())


def allocations_with_usage(allocations: QuerySet) -> QuerySet:
    """Annotate each allocation with what ``billing.services.allocation_usage`` computes:
    ``usage_gpu_ms`` recorded and ``usage_wallet_micros`` (the renter's usage legs, negative),
    in the allocations' own query instead of two queries per row."""
    # A preempted interruptible job is billed up to its notice, not for the grace period after it.
    used = UsageSample.objects.filter(allocation=OuterRef("pk")).filter(
        Q(allocation__preempted_at__isnull=True) | Q(recorded_at__lte=F("allocation__preempted_at"))
    )
    charged = LedgerEntry.objects.filter(
        transaction__allocation=OuterRef("pk"), transaction__kind="usage", account__kind=Account.Kind.RENTER_WALLET
    )
    return allocations.annotate(
        usage_gpu_ms=_total(used, "allocation", "gpu_ms"),
        usage_wallet_micros=_total(charged, "transaction__allocation", "amount_micros"),
    )


def owner_payable_micros(user) -> int:
    entries = LedgerEntry.objects.filter(account__kind=Account.Kind.OWNER_PAYABLE, account__user=user)
    return entries.aggregate(total=Sum("amount_micros"))["total"] or 0


def owner_earnings(user, *, limit: int = 100):
    """The owner's latest credits from usage, with the unit that earned each."""
    return (
        LedgerEntry.objects.filter(account__kind=Account.Kind.OWNER_PAYABLE, account__user=user)
        .select_related("transaction__allocation__unit")
        .order_by("-transaction__created_at", "-id")[:limit]
    )
