"""What the jobs app asks of the apps above it (billing), filled in their ``AppConfig.ready()``.

Jobs never imports billing: it calls these, and billing answers (``billing/apps.py``)."""

from django.db.models import BigIntegerField, Value

from marketplace.kernel.ports import Hook, Provider

# An allocation's usage should be posted now: its job ended, or samples arrived while postings
# are immediate (USAGE_POSTING_INTERVAL_S = 0). Called inside the transaction that caused it.
usage_due = Hook("usage_due")

# Micro-units a renter can start new work with, or None when nothing limits them (a postpaid
# renter; no billing installed).
funds_available = Provider("funds_available", default=lambda renter_id: None)

# Annotate an allocation queryset with ``usage_wallet_micros``: the renter's usage charges so far
# (negative), in the queryset's own query.
allocations_charged = Provider(
    "allocations_charged",
    default=lambda allocations: allocations.annotate(usage_wallet_micros=Value(0, output_field=BigIntegerField())),
)

# A renter's wallet balance in micro-units for their jobs page, or None without billing.
wallet_balance = Provider("wallet_balance", default=lambda user: None)
