"""Statements: what a renter spent and an owner earned over a range of UTC days.

Every function reads the caller's own accounts only, in a fixed number of grouped queries
whatever the number of jobs, units or days. Days are UTC calendar days; a range is inclusive of
both ends. Usage is counted by when the agent recorded it and charged by when it was posted, so
a job that ran across midnight can show its GPU time and its cost a day apart.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.db.models import Exists, F, OuterRef, Q, Subquery, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from billing.models import Account, LedgerEntry, LedgerTransaction, OutboxMessage, TopUp
from marketplace.jobs.models import UsageHour, UsageSample
from marketplace.jobs.usage import BILLABLE, NOT_ROLLED_UP

DEFAULT_DAYS = 30
MAX_DAYS = 366
USAGE_GROUPS = ("day", "job")
EARNINGS_GROUPS = ("day", "unit")


@dataclass(frozen=True)
class Period:
    """Whole UTC days, ``first`` to ``last`` inclusive."""

    first: date
    last: date

    @classmethod
    def default(cls, *, today: date | None = None) -> "Period":
        last = today or timezone.now().astimezone(UTC).date()
        return cls(first=last - timedelta(days=DEFAULT_DAYS - 1), last=last)

    @property
    def start(self) -> datetime:
        return datetime.combine(self.first, time.min, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """The first instant after the period."""
        return datetime.combine(self.last + timedelta(days=1), time.min, tzinfo=UTC)

    def within(self, field: str) -> Q:
        return Q(**{f"{field}__gte": self.start, f"{field}__lt": self.end})


def _balances(entries, period: Period) -> dict:
    """Opening and closing balance of the entries' accounts, in one query."""
    totals = entries.aggregate(
        opening=Sum("amount_micros", filter=Q(transaction__created_at__lt=period.start)),
        closing=Sum("amount_micros", filter=Q(transaction__created_at__lt=period.end)),
        current=Sum("amount_micros"),
    )
    return {name: totals[name] or 0 for name in ("opening", "closing", "current")}


def _usage_samples(user, period: Period):
    # As metering bills it (BILLABLE).
    samples = UsageSample.objects.filter(period.within("recorded_at"), allocation__job__renter=user)
    return samples.filter(BILLABLE, NOT_ROLLED_UP)


def _usage_hours(user, period: Period):
    """Usage rolled up by the hour: periods are whole UTC days, so an hour is in one or not."""
    return UsageHour.objects.filter(period.within("hour"), allocation__job__renter=user)


def _usage_charges(user, period: Period):
    return LedgerEntry.objects.filter(
        period.within("transaction__created_at"),
        account__kind=Account.Kind.RENTER_WALLET,
        account__user=user,
        transaction__kind="usage",
    )


def renter_usage_lines(user, period: Period, *, group: str) -> list[dict]:
    """GPU-milliseconds and cost (micros, positive) per job or per UTC day, in three queries."""
    if group == "job":
        keys = hour_keys = {"job_id": F("allocation__job_id"), "job_name": F("allocation__job__name")}
        charge_keys = {
            "job_id": F("transaction__allocation__job_id"),
            "job_name": F("transaction__allocation__job__name"),
        }
    else:
        keys = {"day": TruncDate("recorded_at", tzinfo=UTC)}
        hour_keys = {"day": TruncDate("hour", tzinfo=UTC)}
        charge_keys = {"day": TruncDate("transaction__created_at", tzinfo=UTC)}
    lines: dict = {}
    used = _usage_samples(user, period).order_by().values(**keys).annotate(gpu_ms=Sum("gpu_ms"))
    rolled_up = _usage_hours(user, period).order_by().values(**hour_keys).annotate(gpu_ms=Sum("billable_gpu_ms"))
    charged = _usage_charges(user, period).order_by().values(**charge_keys).annotate(cost=Sum("amount_micros"))
    for row in [*used, *rolled_up]:
        line = lines.setdefault(_key(row, group), {**_label(row, group), "gpu_ms": 0, "cost_micros": 0})
        line["gpu_ms"] += row["gpu_ms"] or 0
    for row in charged:
        line = lines.setdefault(_key(row, group), {**_label(row, group), "gpu_ms": 0, "cost_micros": 0})
        line["cost_micros"] = -(row["cost"] or 0)
    return sorted(lines.values(), key=lambda line: str(_key(line, group)))


def _key(row: dict, group: str):
    return row["job_id"] if group == "job" else row["day"]


def _label(row: dict, group: str) -> dict:
    if group == "job":
        return {"job_id": row["job_id"], "job_name": row["job_name"] or ""}
    return {"day": row["day"]}


def renter_top_ups(user, period: Period) -> list[dict]:
    """Top-ups credited to the wallet within the period, oldest first."""
    rows = (
        TopUp.objects.filter(period.within("credited__created_at"), renter=user)
        .order_by("credited__created_at")
        .values("id", "amount_minor", "currency", "payment_intent_id", credited_at=F("credited__created_at"))
    )
    return list(rows)


def renter_statement(user, period: Period, *, group: str = "day") -> dict:
    wallet = LedgerEntry.objects.filter(account__kind=Account.Kind.RENTER_WALLET, account__user=user)
    return {
        "group": group,
        "lines": renter_usage_lines(user, period, group=group),
        "top_ups": renter_top_ups(user, period),
        "balance": _balances(wallet, period),
    }


def _owner_payable(user):
    return LedgerEntry.objects.filter(account__kind=Account.Kind.OWNER_PAYABLE, account__user=user)


def owner_earnings_lines(user, period: Period, *, group: str) -> list[dict]:
    """The owner-payable legs of usage postings, per unit (through the posting's allocation) or
    per UTC day, in one query."""
    if group == "unit":
        keys = {"unit_id": F("transaction__allocation__unit_id"), "unit_name": F("transaction__allocation__unit__name")}
        order = "unit_name"
    else:
        keys = {"day": TruncDate("transaction__created_at", tzinfo=UTC)}
        order = "day"
    rows = (
        _owner_payable(user)
        .filter(period.within("transaction__created_at"), transaction__kind="usage")
        .order_by()
        .values(**keys)
        .annotate(earned_micros=Sum("amount_micros"))
        .order_by(order)
    )
    return list(rows)


def owner_payouts(user, period: Period) -> list[dict]:
    """Payout postings from the owner's payable within the period, each with its transfer's
    outbox state and Stripe id, and whether it was reversed after Stripe refused it."""
    outbox = OutboxMessage.objects.filter(ledger_transaction=OuterRef("pk"), operation="transfers.create")
    amount = (
        _owner_payable(user)
        .filter(transaction=OuterRef("pk"))
        .order_by()
        .values("transaction")
        .annotate(total=Sum("amount_micros"))
        .values("total")
    )
    rows = (
        LedgerTransaction.objects.filter(period.within("created_at"), kind="payout")
        .filter(Exists(_owner_payable(user).filter(transaction=OuterRef("pk"))))
        .annotate(
            payable_micros=Subquery(amount),
            transfer_state=Subquery(outbox.values("state")[:1]),
            transfer_id=Subquery(outbox.values("stripe_id")[:1]),
        )
        .order_by("created_at", "id")
        .values("key", "created_at", "payable_micros", "transfer_state", "transfer_id")
    )
    reversed_keys = set(
        LedgerTransaction.objects.filter(
            kind="payout_reversal", key__startswith="payout_reversal:payout:", created_at__gte=period.start
        )
        .filter(Exists(_owner_payable(user).filter(transaction=OuterRef("pk"))))
        .values_list("key", flat=True)
    )
    return [
        {
            "key": row["key"],
            "created_at": row["created_at"],
            "amount_micros": -(row["payable_micros"] or 0),
            "transfer_state": row["transfer_state"] or "",
            "transfer_id": row["transfer_id"] or "",
            "reversed": f"payout_reversal:{row['key']}" in reversed_keys,
        }
        for row in rows
    ]


def owner_statement(user, period: Period, *, group: str = "day") -> dict:
    return {
        "group": group,
        "lines": owner_earnings_lines(user, period, group=group),
        "payouts": owner_payouts(user, period),
        "balance": _balances(_owner_payable(user), period),
    }
