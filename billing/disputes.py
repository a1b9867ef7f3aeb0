"""Renter money that went back at Stripe: refunds and disputes of a top-up's charge.

The ledger follows in steps, each one posting keyed on the refund or dispute: what is still in
the wallet is taken from it; the rest was spent, so it is taken back from the owners (and the
platform fee) of the renter's latest usage; an owner left owing because they were already paid
has the difference reversed from their last transfer. If Stripe refuses that reversal the payable
simply stays negative: payouts skip it and later earnings net against it.
"""

import logging
from collections import defaultdict

from django.conf import settings
from django.db import transaction
from django.db.models import Sum

from billing.models import Account, LedgerEntry, LedgerTransaction, OutboxMessage, TopUp, WebhookEvent
from billing.outbox import outbox_enqueue
from billing.selectors import owner_payable_micros, wallet_balance_micros
from billing.services import account_for, ledger_post
from billing.stripe_api import client
from billing.webhooks import NotYet, event_object_id
from marketplace.kernel.audit import audit_record

log = logging.getLogger(__name__)

RETURNED = "renter_money_returned"  # taken from the wallet
CLAWBACK = "earnings_clawback"  # taken back from an owner's payable and the platform fee
LOSS = "renter_money_loss"  # returned money neither the wallet nor usage covers
TRANSFER_REVERSAL = "transfer_reversal"  # an owner's transfer reversed at Stripe
REINSTATED = "dispute_reinstated"  # a won dispute: the mirror of the steps above


def _options(event: WebhookEvent) -> dict:
    return {"stripe_account": event.account} if event.account else {}


def _topup_for(payment_intent_id: str | None) -> TopUp | None:
    """The credited top-up paid by the PaymentIntent, locked; None when it is not a top-up."""
    if not payment_intent_id:
        return None
    topup = TopUp.objects.select_for_update().filter(payment_intent_id=payment_intent_id).first()
    if topup is not None and topup.credited_id is None:
        # Money cannot go back before it arrived: the success event is still to be processed.
        raise NotYet(f"top-up {topup.id} is not credited yet")
    return topup


def _spent_usage(renter) -> list[list]:
    """The renter's usage postings, newest first, as [created, payable entry, fee, charge left]:
    what each charged, less what earlier refunds and disputes took back from it. Those took,
    each at its moment, from the newest usage then left; replaying them in order says which."""
    wallet = account_for(Account.Kind.RENTER_WALLET, renter)
    usage = (
        LedgerTransaction.objects.filter(kind="usage", entries__account=wallet, entries__amount_micros__lt=0)
        .order_by("-created_at", "-id")
        .prefetch_related("entries__account")
    )
    postings = []
    for txn in usage:
        payable = next((e for e in txn.entries.all() if e.account.kind == Account.Kind.OWNER_PAYABLE), None)
        fee = sum(e.amount_micros for e in txn.entries.all() if e.account.kind == Account.Kind.PLATFORM_FEES)
        charge = (payable.amount_micros if payable is not None else 0) + fee
        postings.append([txn.created_at, payable, fee, charge])
    for when, amount in _earlier_takebacks(renter):
        for posting in postings:
            if amount <= 0:
                break
            if posting[0] <= when and posting[3] > 0:
                took = min(amount, posting[3])
                posting[3] -= took
                amount -= took
    return postings


def _earlier_takebacks(renter) -> list[tuple]:
    """(when, amount) of each earlier refund or dispute that took this renter's usage back and
    was not won back, oldest first."""
    clearing = account_for(Account.Kind.STRIPE_CLEARING)
    entries = LedgerEntry.objects.filter(
        account=clearing, transaction__kind=CLAWBACK, transaction__key__endswith=f":renter:{renter.pk}"
    ).values_list("transaction__key", "transaction__created_at", "amount_micros")
    won_back = set(
        LedgerTransaction.objects.filter(kind=REINSTATED, key__endswith=f":renter:{renter.pk}").values_list(
            "key", flat=True
        )
    )
    events: dict[str, list] = {}
    for key, when, amount in entries:
        if f"reinstated:{key}" in won_back:
            continue
        event = events.setdefault(key.split(":owner:")[0], [when, 0])
        event[0], event[1] = min(event[0], when), event[1] + amount
    return sorted((when, amount) for when, amount in events.values())


def _clawback_key(key: str, owner_id, renter_id) -> str:
    return f"{key}:owner:{owner_id}:renter:{renter_id}"


def _clawback_split(renter, amount: int) -> tuple[dict[Account, list[int]], int]:
    """How to take ``amount`` back from the renter's latest usage: {payable: [owner part, fee]}
    and what no usage covers. Each posting gives back up to its whole charge, split between
    owner and fee in its own proportion; the parts sum to ``amount`` exactly. Usage earlier
    refunds or disputes took back is not taken again."""
    taken: dict[Account, list[int]] = defaultdict(lambda: [0, 0])
    left = amount
    for _, payable, fee, charge in _spent_usage(renter):
        if left <= 0:
            break
        if charge <= 0 or payable is None:
            continue
        # Of a posting partly taken back already, the rest, in the posting's own proportion.
        owner_part = payable.amount_micros * charge // (payable.amount_micros + fee)
        take = min(left, charge)
        x = take * owner_part // charge
        taken[payable.account][0] += x
        taken[payable.account][1] += take - x
        left -= take
    return dict(taken), left


def _last_transfer(owner) -> OutboxMessage | None:
    return (
        OutboxMessage.objects.filter(user=owner, operation="transfers.create", state=OutboxMessage.State.SENT)
        .order_by("-sent_at")
        .first()
    )


def _reversal_request(*, owner, clawback: LedgerTransaction) -> OutboxMessage | None:
    """Ask Stripe to reverse, from the owner's last transfer, what they now owe in whole minor
    units, less reversals already on their way."""
    owed = -owner_payable_micros(owner) // settings.MICROS_PER_MINOR
    pending = OutboxMessage.objects.filter(
        user=owner, operation="transfers.create_reversal", state=OutboxMessage.State.PENDING
    )
    owed -= sum(m.payload["amount"] for m in pending)
    transfer = _last_transfer(owner)
    if owed <= 0 or transfer is None:
        return None
    asked = OutboxMessage.objects.filter(
        operation="transfers.create_reversal", payload__transfer=transfer.stripe_id
    ).exclude(state=OutboxMessage.State.FAILED)
    room = (transfer.result or {}).get("amount", 0) - sum(m.payload["amount"] for m in asked)
    amount = min(owed, room)
    if amount <= 0:
        return None
    return outbox_enqueue(
        operation="transfers.create_reversal",
        payload={
            "transfer": transfer.stripe_id,
            "amount": amount,
            "metadata": {"ledger_key": clawback.key, "owner_id": str(owner.pk)},
        },
        user=owner,
        ledger_transaction=clawback,
    )


def renter_money_return(
    *, topup: TopUp, amount_micros: int, key: str, why: str, reverse_transfers: bool = True
) -> list[LedgerTransaction]:
    """Follow money of ``topup`` that went back to the renter's card (refund or dispute) in the
    ledger, once per ``key``; call it in a transaction holding the top-up's row lock. Owners
    left owing have it reversed from their last transfer unless ``reverse_transfers`` is off."""
    if LedgerTransaction.objects.filter(key__startswith=f"{key}:").exists():
        return []
    renter = topup.renter
    clearing = account_for(Account.Kind.STRIPE_CLEARING)
    # A usage posting at the same moment may spend the balance read here; the wallet then goes
    # slightly negative instead of an owner giving back that usage, which the next top-up covers.
    wallet_part = min(amount_micros, max(wallet_balance_micros(renter), 0))
    posted = []
    if wallet_part:
        wallet = account_for(Account.Kind.RENTER_WALLET, renter)
        posted.append(
            ledger_post(
                key=f"{key}:wallet", kind=RETURNED, legs=[(wallet, -wallet_part), (clearing, wallet_part)], memo=why
            )
        )
    split, uncovered = _clawback_split(renter, amount_micros - wallet_part)
    fees = account_for(Account.Kind.PLATFORM_FEES)
    for payable, (x, f) in sorted(split.items(), key=lambda item: item[0].pk):
        clawback = ledger_post(
            key=_clawback_key(key, payable.user_id, renter.pk),
            kind=CLAWBACK,
            legs=[(payable, -x), (fees, -f), (clearing, x + f)],
            memo=f"{why}: usage of renter {renter.pk} taken back",
        )
        posted.append(clawback)
        if reverse_transfers and owner_payable_micros(payable.user) < 0:
            _reversal_request(owner=payable.user, clawback=clawback)
    if uncovered:
        losses = account_for(Account.Kind.PLATFORM_LOSSES)
        posted.append(
            ledger_post(key=f"{key}:loss", kind=LOSS, legs=[(losses, -uncovered), (clearing, uncovered)], memo=why)
        )
    audit_record(f"ledger.{key.split(':')[0]}_followed", topup.id, key=key, amount_micros=amount_micros)
    return posted


def renter_money_reinstate(*, key: str, why: str) -> list[LedgerTransaction]:
    """The mirror of every posting made under ``key``: the money came back (a dispute won)."""
    posted = []
    for txn in LedgerTransaction.objects.filter(key__startswith=f"{key}:").exclude(kind=REINSTATED).order_by("id"):
        legs = [(e.account, -e.amount_micros) for e in txn.entries.select_related("account")]
        posted.append(ledger_post(key=f"reinstated:{txn.key}", kind=REINSTATED, legs=legs, memo=why))
    return posted


@transaction.atomic
def refund_event(event: WebhookEvent) -> None:
    """``charge.refunded``: the charge's ``amount_refunded`` is cumulative, so only the part
    not yet followed is posted, keyed on the total; any delivery order ends the same."""
    charge = client().v1.charges.retrieve(event_object_id(event), options=_options(event)).to_dict()
    topup = _topup_for(charge.get("payment_intent"))
    if topup is None:
        return
    prefix = f"refund:{charge['id']}:"
    followed = (
        LedgerEntry.objects.filter(
            transaction__key__startswith=prefix, account__kind=Account.Kind.STRIPE_CLEARING
        ).aggregate(total=Sum("amount_micros"))["total"]
        or 0
    )
    increase = charge["amount_refunded"] * settings.MICROS_PER_MINOR - followed
    if increase > 0:
        renter_money_return(
            topup=topup,
            amount_micros=increase,
            key=f"{prefix}{charge['amount_refunded']}",
            why=f"refund of charge {charge['id']}",
        )


@transaction.atomic
def dispute_event(event: WebhookEvent) -> None:
    """Any ``charge.dispute.*`` event: the dispute re-read at Stripe says where it stands. Funds
    are withdrawn when a dispute opens (an inquiry, ``warning_*``, withdraws nothing) and come
    back when it is won."""
    dispute = client().v1.disputes.retrieve(event_object_id(event), options=_options(event)).to_dict()
    if dispute["status"].startswith("warning_"):
        return
    topup = _topup_for(dispute.get("payment_intent"))
    if topup is None:
        return
    key = f"dispute:{dispute['id']}"
    renter_money_return(
        topup=topup,
        amount_micros=dispute["amount"] * settings.MICROS_PER_MINOR,
        key=key,
        why=f"dispute {dispute['id']} of charge {dispute['charge']}",
        # Seen for the first time already won: the money is back, so no owner needs reversing.
        reverse_transfers=dispute["status"] != "won",
    )
    if dispute["status"] == "won":
        renter_money_reinstate(key=key, why=f"dispute {dispute['id']} won")


@transaction.atomic
def transfer_reversal_sent(*, message: OutboxMessage) -> LedgerTransaction:
    """Outbox follow-up: Stripe reversed part of an owner's transfer, so they owe that much less."""
    micros = message.payload["amount"] * settings.MICROS_PER_MINOR
    return ledger_post(
        key=f"{TRANSFER_REVERSAL}:{message.id}",
        kind=TRANSFER_REVERSAL,
        legs=[
            (account_for(Account.Kind.OWNER_PAYABLE, message.user), micros),
            (account_for(Account.Kind.STRIPE_CLEARING), -micros),
        ],
        memo=f"reversal {message.stripe_id} of transfer {message.payload['transfer']}",
    )


def transfer_reversal_refused(*, message: OutboxMessage, code: str) -> None:
    """Outbox follow-up: Stripe refused the reversal (``balance_insufficient`` when the owner's
    account holds too little). Nothing to post: the payable stays negative until earned back."""
    log.warning("transfer reversal %s refused (%s); owner %s stays owing", message.id, code, message.user_id)
    audit_record("payout.reversal_refused", message.id, code=code, owner=str(message.user_id))
