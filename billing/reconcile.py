"""Compare the ledger, the outbox and Stripe, and list every place where they disagree.

Reads only. Stripe is read through list calls with auto-pagination, bounded by ``since``; an
object our side names but the listing missed (made just before ``since``) is retrieved by id.
"""

import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import stripe
from django.conf import settings
from django.db.models import Exists, OuterRef, Q, Sum, Value
from django.db.models.functions import Concat
from django.utils import timezone

from billing.models import LedgerEntry, LedgerTransaction, OutboxMessage, TopUp
from billing.payouts import PAYOUT, PAYOUT_REVERSAL
from billing.stripe_api import client

STUCK_AFTER = timedelta(hours=1)
# Our clock and Stripe's differ a little, and a row is written just before its object is made.
LISTING_SLACK = timedelta(days=1)


@dataclass(frozen=True)
class Drift:
    code: str
    subject: str
    detail: str

    def line(self) -> str:
        return f"DRIFT {self.code} {self.subject}: {self.detail}"


def _listed(service, since: datetime) -> dict[str, dict]:
    params = {"limit": 100, "created": {"gte": int((since - LISTING_SLACK).timestamp())}}
    return {obj.id: obj.to_dict() for obj in service.list(params=params).auto_paging_iter()}


def _fetch(service, listed: dict[str, dict], id_: str) -> dict | None:
    if id_ in listed:
        return listed[id_]
    try:
        return service.retrieve(id_).to_dict()
    except stripe.InvalidRequestError:
        return None


def topups_check(stripe_client, since: datetime) -> list[Drift]:
    service = stripe_client.v1.payment_intents
    intents = _listed(service, since)
    drift = []
    credited = TopUp.objects.filter(credited__isnull=False, created_at__gte=since).order_by("created_at")
    for topup in credited:
        intent = _fetch(service, intents, topup.payment_intent_id) if topup.payment_intent_id else None
        subject = f"topup:{topup.id}"
        if intent is None:
            drift.append(
                Drift("topup.payment_intent_missing", subject, f"no PaymentIntent {topup.payment_intent_id!r}")
            )
        elif intent["status"] != "succeeded":
            drift.append(Drift("topup.not_succeeded", subject, f"{intent['id']} is {intent['status']}, not succeeded"))
        elif (intent["amount_received"], intent["currency"]) != (topup.amount_minor, topup.currency):
            drift.append(
                Drift(
                    "topup.amount_mismatch",
                    subject,
                    f"credited {topup.amount_minor} {topup.currency}, {intent['id']} received "
                    f"{intent['amount_received']} {intent['currency']}",
                )
            )
    claimed = {
        intent["metadata"]["topup_id"]: intent
        for intent in intents.values()
        if intent["status"] == "succeeded" and (intent.get("metadata") or {}).get("topup_id")
    }
    known = {
        str(pk)
        for pk in TopUp.objects.filter(pk__in=_uuids(claimed), credited__isnull=False).values_list("pk", flat=True)
    }
    for topup_id, intent in sorted(claimed.items()):
        if topup_id not in known:
            drift.append(
                Drift(
                    "payment_intent.not_credited",
                    intent["id"],
                    f"succeeded for top-up {topup_id} ({intent['amount_received']} {intent['currency']}) "
                    "but the wallet was never credited",
                )
            )
    return drift


def _uuids(values) -> list[str]:
    found = []
    for value in values:
        try:
            found.append(str(uuid.UUID(value)))
        except ValueError:
            continue
    return found


def payouts_check(stripe_client, since: datetime) -> list[Drift]:
    service = stripe_client.v1.transfers
    transfers = _listed(service, since)
    drift = []
    payouts = (
        LedgerTransaction.objects.filter(kind=PAYOUT, created_at__gte=since)
        .annotate(paid_out=Sum("entries__amount_micros", filter=Q(entries__amount_micros__gt=0)))
        .order_by("created_at", "id")
    )
    messages = {
        m.ledger_transaction_id: m
        for m in OutboxMessage.objects.filter(operation="transfers.create", ledger_transaction__in=payouts)
    }
    for txn in payouts:
        subject = txn.key
        message = messages.get(txn.pk)
        if message is None:
            drift.append(Drift("payout.outbox_missing", subject, "no transfers.create outbox row"))
            continue
        if message.state != OutboxMessage.State.SENT:
            continue  # pending or failed: the outbox checks report it when it matters
        transfer = _fetch(service, transfers, message.stripe_id)
        if transfer is None:
            drift.append(
                Drift("payout.transfer_missing", subject, f"outbox sent {message.stripe_id!r}, Stripe has none")
            )
            continue
        expected = {
            "amount": (txn.paid_out or 0) // settings.MICROS_PER_MINOR,
            "destination": message.payload.get("destination"),
            "transfer_group": f"{PAYOUT}:{txn.key}",
        }
        for field, want in expected.items():
            if transfer.get(field) != want:
                drift.append(
                    Drift(
                        f"payout.{field}_mismatch",
                        subject,
                        f"{transfer['id']} has {transfer.get(field)!r}, ledger {want!r}",
                    )
                )
        if transfer.get("amount_reversed"):
            drift.append(
                Drift("payout.transfer_reversed", subject, f"{transfer['id']} reversed {transfer['amount_reversed']}")
            )
    drift += _transfers_without_posting(transfers)
    return drift


def _transfers_without_posting(transfers: dict[str, dict]) -> list[Drift]:
    prefix = f"{PAYOUT}:"
    grouped = {
        t["id"]: t["transfer_group"][len(prefix) :]
        for t in transfers.values()
        if (t.get("transfer_group") or "").startswith(prefix)
    }
    recorded = dict(
        OutboxMessage.objects.filter(
            operation="transfers.create",
            ledger_transaction__kind=PAYOUT,
            ledger_transaction__key__in=set(grouped.values()),
        ).values_list("ledger_transaction__key", "stripe_id")
    )
    drift = []
    for transfer_id, key in sorted(grouped.items()):
        if key not in recorded:
            drift.append(
                Drift("transfer.no_posting", transfer_id, f"transfer_group payout:{key} has no payout posting")
            )
        elif recorded[key] != transfer_id:
            drift.append(Drift("transfer.unrecorded", transfer_id, f"payout {key} records {recorded[key]!r} instead"))
    return drift


def outbox_check(now: datetime) -> list[Drift]:
    drift = []
    stuck = OutboxMessage.objects.filter(state=OutboxMessage.State.PENDING, created_at__lt=now - STUCK_AFTER)
    for message in stuck.order_by("created_at"):
        age = now - message.created_at
        drift.append(
            Drift(
                "outbox.stuck",
                str(message.id),
                f"{message.operation} pending for {age} after {message.attempts} attempts",
            )
        )
    # A transfer Stripe refused and whose payout was reversed is settled: the owner is owed again.
    reversal = LedgerTransaction.objects.filter(
        key=Concat(Value(f"{PAYOUT_REVERSAL}:"), OuterRef("ledger_transaction__key"))
    )
    failed = (
        OutboxMessage.objects.filter(state=OutboxMessage.State.FAILED)
        .exclude(operation="transfers.create", ledger_transaction__kind=PAYOUT, pk__in=_with(reversal))
        .order_by("created_at")
    )
    for message in failed:
        drift.append(Drift("outbox.failed", str(message.id), f"{message.operation}: {message.last_error[:200]}"))
    return drift


def _with(reversal):
    return OutboxMessage.objects.filter(Exists(reversal)).values("pk")


def ledger_check() -> list[Drift]:
    drift = [
        Drift("ledger.unbalanced", row["transaction__key"], f"legs sum to {row['total']} micros")
        for row in LedgerEntry.objects.order_by()
        .values("transaction__key")
        .annotate(total=Sum("amount_micros"))
        .exclude(total=0)
        .order_by("transaction__key")
    ]
    total = LedgerEntry.objects.aggregate(total=Sum("amount_micros"))["total"] or 0
    if total:
        drift.append(Drift("ledger.total_not_zero", "ledger", f"all accounts sum to {total} micros"))
    return drift


def reconcile(*, since: datetime, now: datetime | None = None) -> list[Drift]:
    now = now or timezone.now()
    stripe_client = client()
    return topups_check(stripe_client, since) + payouts_check(stripe_client, since) + outbox_check(now) + ledger_check()


def summary(drift: list[Drift], *, since: datetime) -> dict:
    return {
        "since": since.isoformat(),
        "drift": len(drift),
        "by_code": dict(sorted(Counter(d.code for d in drift).items())),
        "items": [asdict(d) for d in drift],
    }
