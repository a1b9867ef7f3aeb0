from django.db.models import Sum

from billing.models import Account, LedgerEntry


def wallet_balance_micros(user) -> int:
    entries = LedgerEntry.objects.filter(account__kind=Account.Kind.RENTER_WALLET, account__user=user)
    return entries.aggregate(total=Sum("amount_micros"))["total"] or 0
