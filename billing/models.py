from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from marketplace.models import Allocation


class UsageSample(models.Model):
    """GPU time reported by an agent for one allocation; (allocation, seq) is unique, so a
    repeated or replayed sample can never be counted twice."""

    allocation = models.ForeignKey(Allocation, on_delete=models.PROTECT, related_name="usage_samples")
    seq = models.PositiveIntegerField()
    gpu_ms = models.BigIntegerField(help_text="GPU-milliseconds in this sample (GPUs x wall time).")
    recorded_at = models.DateTimeField(help_text="When the agent took the sample.")
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["allocation", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["allocation", "seq"], name="usage_sample_unique_seq"),
            models.CheckConstraint(condition=Q(gpu_ms__gte=0), name="usage_sample_not_negative"),
        ]

    def __str__(self) -> str:
        return f"usage {self.allocation_id}#{self.seq}"


class Account(models.Model):
    class Kind(models.TextChoices):
        RENTER_WALLET = "renter_wallet"
        OWNER_PAYABLE = "owner_payable"
        PLATFORM_FEES = "platform_fees"
        STRIPE_CLEARING = "stripe_clearing"
        PLATFORM_LOSSES = "platform_losses"

    kind = models.CharField(max_length=20, choices=Kind.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="accounts"
    )
    currency = models.CharField(max_length=3, default="usd")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["kind", "user", "currency"], name="account_unique_per_user"),
            models.UniqueConstraint(
                fields=["kind", "currency"], condition=Q(user__isnull=True), name="account_unique_platform"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind}:{self.user_id or 'platform'}:{self.currency}"


class LedgerTransaction(models.Model):
    """A balanced set of entries. Written only by ``billing.services.ledger_post``, which
    refuses legs that do not sum to zero; rows are never updated or deleted."""

    key = models.CharField(max_length=120, unique=True, help_text="Idempotency key of the posting.")
    kind = models.CharField(max_length=40)
    allocation = models.ForeignKey(
        Allocation, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_transactions"
    )
    memo = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return self.key


class LedgerEntry(models.Model):
    transaction = models.ForeignKey(LedgerTransaction, on_delete=models.PROTECT, related_name="entries")
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="entries")
    amount_micros = models.BigIntegerField(help_text="Positive credits the account, negative debits it.")

    class Meta:
        verbose_name_plural = "ledger entries"

    def __str__(self) -> str:
        return f"{self.account}: {self.amount_micros}"
