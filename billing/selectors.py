import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum

import stripe
from django.db.models import BigIntegerField, Count, Exists, F, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, Concat, TruncDate

from billing.models import Account, BillingProfile, LedgerEntry, LedgerTransaction, OutboxMessage
from billing.statements import Period, owner_earnings_lines
from billing.stripe_api import client, configured
from marketplace.jobs.models import UsageHour, UsageSample
from marketplace.jobs.usage import NOT_ROLLED_UP
from nodes.models import Unit

log = logging.getLogger(__name__)

DAY = timedelta(days=1)
MS = timedelta(milliseconds=1)


def wallet_balance_micros(user) -> int:
    entries = LedgerEntry.objects.filter(account__kind=Account.Kind.RENTER_WALLET, account__user=user)
    return entries.aggregate(total=Sum("amount_micros"))["total"] or 0


def _total(rows: QuerySet, group: str, field: str) -> Coalesce:
    # order_by() drops the model's default ordering, which would otherwise split the GROUP BY.
    total = rows.order_by().values(group).annotate(total=Sum(field)).values("total")
    return Coalesce(Subquery(total), 0, output_field=BigIntegerField())


def owner_payable_micros(user) -> int:
    entries = LedgerEntry.objects.filter(account__kind=Account.Kind.OWNER_PAYABLE, account__user=user)
    return entries.aggregate(total=Sum("amount_micros"))["total"] or 0


def owner_usage_lines(user) -> QuerySet:
    """One row per usage posting that credited the owner: what a job earned them (after the
    fee), when, on which unit, with ``key`` and ``previous_key`` for ``usage_line_gpu_ms``."""
    previous = (
        LedgerTransaction.objects.filter(
            allocation=OuterRef("transaction__allocation_id"), kind="usage", pk__lt=OuterRef("transaction_id")
        )
        .order_by("-pk")
        .values("key")[:1]
    )
    return LedgerEntry.objects.filter(
        account__kind=Account.Kind.OWNER_PAYABLE, account__user=user, transaction__kind="usage"
    ).values(
        "amount_micros",
        currency=F("account__currency"),
        posted_at=F("transaction__created_at"),
        key=F("transaction__key"),
        previous_key=Subquery(previous),
        unit_name=F("transaction__allocation__unit__name"),
        job_id=F("transaction__allocation__job_id"),
    )


def usage_line_gpu_ms(line: dict) -> int | None:
    """The GPU-milliseconds one usage posting charged for. A posting's key is
    ``usage:<allocation>:<GPU-ms recorded so far>`` (``billing.services.usage_post``, ``usage_rate``),
    and postings of one allocation are serialised by its row lock, so the difference from the
    allocation's previous posting is what this one covered. None for a key of another shape."""
    try:
        total = int(line["key"].rsplit(":", 1)[1])
        before = int(line["previous_key"].rsplit(":", 1)[1]) if line["previous_key"] else 0
    except (IndexError, ValueError):
        return None
    return total - before


def owner_earnings_by_day(user, period: Period) -> list[dict]:
    """{"day", "earned_micros"} for every UTC day of the period, oldest first, in one query."""
    earned = {row["day"]: row["earned_micros"] for row in owner_earnings_lines(user, period, group="day")}
    return [{"day": day, "earned_micros": earned.get(day, 0)} for day in _days(period)]


def owner_unit_utilisation(user, period: Period, *, now: datetime) -> list[dict]:
    """Per unit of the owner's, for every UTC day of the period: GPU time used by jobs (the usage
    samples' GPU-ms, by when the agent recorded them) over GPU time there was (GPUs the unit
    reports now x the day, or the part of today gone by), as a percentage with one decimal,
    capped at 100 (a sample can carry time from before midnight). Three queries: samples, and
    the hours rolled up from older ones."""
    # Earnings are the caller's own even for staff, so the units beside them are too.
    units = (
        Unit.objects.filter(owner=user)
        .annotate(gpu_count=Count("gpus", filter=Q(gpus__present=True)))
        .order_by("name", "pk")
        .values("pk", "name", "status", "gpu_count")
    )
    samples = (
        UsageSample.objects.filter(period.within("recorded_at"), NOT_ROLLED_UP, allocation__unit__owner=user)
        .order_by()
        .values(unit_id=F("allocation__unit_id"), day=TruncDate("recorded_at", tzinfo=UTC))
        .annotate(gpu_ms=Sum("gpu_ms"))
    )
    hours = (
        UsageHour.objects.filter(period.within("hour"), allocation__unit__owner=user)
        .order_by()
        .values(unit_id=F("allocation__unit_id"), day=TruncDate("hour", tzinfo=UTC))
        .annotate(gpu_ms=Sum("gpu_ms"))
    )
    used: dict = {}
    for row in [*samples, *hours]:
        used[row["unit_id"], row["day"]] = used.get((row["unit_id"], row["day"]), 0) + row["gpu_ms"]
    result = []
    for unit in units:
        if unit["status"] == Unit.Status.RETIRED and not any(key[0] == unit["pk"] for key in used):
            continue
        days = []
        for day in _days(period):
            start = datetime.combine(day, time.min, tzinfo=UTC)
            available = unit["gpu_count"] * int(min(DAY, max(now - start, timedelta())) / MS)
            gpu_ms = used.get((unit["pk"], day), 0)
            percent = _percent(gpu_ms, available)
            days.append({"day": day, "gpu_ms": gpu_ms, "gpu_hours": gpu_hours(gpu_ms), "percent": percent})
        result.append({"name": unit["name"], "gpu_count": unit["gpu_count"], "days": days})
    return result


def gpu_hours(gpu_ms: int | None) -> Decimal | None:
    """GPU-milliseconds as GPU-hours to two decimals, rounded down (as usage is charged)."""
    if gpu_ms is None:
        return None
    return (Decimal(gpu_ms) / 3_600_000).quantize(Decimal("0.01"), rounding=ROUND_DOWN)


def _days(period: Period) -> list[date]:
    return [period.first + timedelta(days=n) for n in range((period.last - period.first).days + 1)]


def _percent(part: int, whole: int) -> Decimal:
    if whole <= 0:
        return Decimal("0.0")
    tenths = min((part * 2000 + whole) // (2 * whole), 1000)  # per mille, rounded half up
    return (Decimal(tenths) / 10).quantize(Decimal("0.1"))


def owner_transfers(user, *, limit: int) -> list[dict]:
    """The owner's payouts, newest first: amount (micros, positive), the transfer's outbox state
    and Stripe id, and whether the payout was reversed after Stripe refused it. One query."""
    transfer = OutboxMessage.objects.filter(ledger_transaction=OuterRef("transaction_id"), operation="transfers.create")
    reversal = LedgerTransaction.objects.filter(
        kind="payout_reversal", key=Concat(Value("payout_reversal:"), OuterRef("transaction__key"))
    )
    rows = (
        LedgerEntry.objects.filter(account__kind=Account.Kind.OWNER_PAYABLE, account__user=user)
        .filter(transaction__kind="payout")
        .order_by("-transaction__created_at", "-pk")
        .values(
            "amount_micros",
            created_at=F("transaction__created_at"),
            state=Subquery(transfer.values("state")[:1]),
            stripe_id=Subquery(transfer.values("stripe_id")[:1]),
            reversed=Exists(reversal),
        )[:limit]
    )
    return [{**row, "amount_micros": -row["amount_micros"]} for row in rows]


class ConnectState(StrEnum):
    UNAVAILABLE = "unavailable"  # this marketplace has no Stripe account
    NOT_CONNECTED = "not_connected"
    INCOMPLETE = "incomplete"  # the owner has not submitted their details to Stripe
    RESTRICTED = "restricted"  # submitted, but Stripe has not enabled payouts (needs more, or is checking)
    ENABLED = "enabled"


# What Stripe asks for, in words, for the fields it asks for most; others are shown as Stripe names them.
STRIPE_NEEDS = {
    "external_account": "a bank account to pay out to",
    "tos_acceptance.date": "accepting Stripe's terms",
    "tos_acceptance.ip": "accepting Stripe's terms",
    "individual.verification.document": "an identity document",
    "individual.id_number": "your ID number",
    "business_profile.url": "your business website",
    "business_profile.mcc": "your business category",
}


@dataclass(frozen=True)
class ConnectStatus:
    state: ConnectState
    account_id: str = ""
    needs: tuple[str, ...] = ()  # Stripe's requirements.currently_due and past_due
    disabled_reason: str = ""

    @property
    def needs_in_words(self) -> list[str]:
        return list(dict.fromkeys(STRIPE_NEEDS.get(field, field.replace("_", " ")) for field in self.needs))


def _standing(account_id: str, *, payouts_enabled: bool, details_submitted: bool, needs, disabled_reason: str):
    if payouts_enabled:
        state = ConnectState.ENABLED
    elif not details_submitted:
        state = ConnectState.INCOMPLETE
    else:
        state = ConnectState.RESTRICTED
    return ConnectStatus(state, account_id, tuple(needs), disabled_reason or "")


def connect_status(user, *, live: bool = False) -> ConnectStatus:
    """The owner's payout standing as we last heard it from Stripe (``account.updated``); with
    ``live``, as Stripe says now (the onboarding return page), falling back to what we know if
    Stripe cannot be reached."""
    if not configured():
        return ConnectStatus(ConnectState.UNAVAILABLE)
    profile = (
        BillingProfile.objects.filter(user=user)
        .values("stripe_account_id", "payouts_enabled", "details_submitted", "requirements_due", "disabled_reason")
        .first()
    )
    if not profile or not profile["stripe_account_id"]:
        return ConnectStatus(ConnectState.NOT_CONNECTED)
    account_id = profile["stripe_account_id"]
    known = _standing(
        account_id,
        payouts_enabled=profile["payouts_enabled"],
        details_submitted=profile["details_submitted"],
        needs=profile["requirements_due"] or (),
        disabled_reason=profile["disabled_reason"],
    )
    if not live:
        return known
    try:
        account = client().v1.accounts.retrieve(account_id).to_dict()
    except stripe.StripeError:
        log.warning("Connect account %s of user %s could not be read", account_id, user.pk, exc_info=True)
        return known
    requirements = account.get("requirements") or {}
    return _standing(
        account_id,
        payouts_enabled=bool(account.get("payouts_enabled")),
        details_submitted=bool(account.get("details_submitted")),
        needs=dict.fromkeys((requirements.get("past_due") or []) + (requirements.get("currently_due") or [])),
        disabled_reason=requirements.get("disabled_reason") or "",
    )


def allocations_charged(allocations: QuerySet) -> QuerySet:
    """Annotate each allocation with ``usage_wallet_micros``: the renter's usage legs so far
    (negative), in the allocations' own query (it answers ``marketplace.jobs.ports.allocations_charged``)."""
    charged = LedgerEntry.objects.filter(
        transaction__allocation=OuterRef("pk"), transaction__kind="usage", account__kind=Account.Kind.RENTER_WALLET
    )
    return allocations.annotate(usage_wallet_micros=_total(charged, "transaction__allocation", "amount_micros"))
