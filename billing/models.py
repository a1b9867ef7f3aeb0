import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from marketplace.jobs.models import Allocation


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
    """A balanced set of entries. Written only by ``billing.services`` (``ledger_post``, which
    refuses legs that do not sum to zero, and ``usage_rate``, which posts many usage charges
    at once, each split into legs summing to zero); rows are never updated or deleted."""

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


class BillingProfile(models.Model):
    """A user's standing with Stripe: the renter's Customer, the owner's Connect account."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="billing")
    stripe_customer_id = models.CharField(max_length=64, blank=True)
    stripe_account_id = models.CharField(max_length=64, blank=True, help_text="Connect account (owners).")
    payouts_enabled = models.BooleanField(default=False, help_text="As Stripe last said in account.updated.")
    # The rest of the Connect account's standing as of that account.updated, so the portal can
    # tell onboarding left half-done from an account Stripe restricted without asking Stripe.
    details_submitted = models.BooleanField(default=False)
    requirements_due = models.JSONField(default=list, blank=True, help_text="requirements past_due + currently_due")
    disabled_reason = models.CharField(max_length=80, blank=True)
    postpaid = models.BooleanField(default=False, help_text="Billed monthly through Stripe Billing meters.")

    def __str__(self) -> str:
        return f"billing of {self.user}"


class OutboxMessage(models.Model):
    """One Stripe side effect, written in the same transaction as the ledger entries it goes
    with and sent later by ``billing.outbox``. The payload is frozen at creation; the
    idempotency key is derived from the row id, so a resend can never make a second object."""

    class State(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed"  # Stripe refused it for good (a bug or a bad request): needs a person
        CANCELLED = "cancelled"  # an operator gave it up before it was sent (billing.outbox.CANCELLABLE)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    operation = models.CharField(max_length=40, help_text="e.g. customers.create, payment_intents.create.")
    payload = models.JSONField(help_text="The request's parameters, frozen when the row was written.")
    stripe_account = models.CharField(max_length=64, blank=True, help_text="Connect account to act as, if any.")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="outbox"
    )
    ledger_transaction = models.ForeignKey(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="outbox"
    )
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # Stripe answers a key it has seen with its first answer, a refusal too, for 24 hours: a row
    # an operator sends again after Stripe refused it (billing.outbox.outbox_retry) needs a key of
    # its own, and each such resend counts here.
    resends = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True)
    stripe_id = models.CharField(max_length=64, blank=True, help_text="The object Stripe made or returned.")
    result = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["state", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.operation} {self.id} ({self.state})"

    @property
    def idempotency_key(self) -> str:
        key = f"shedshare-outbox-{self.id}"
        return f"{key}-resend-{self.resends}" if self.resends else key


class TopUp(models.Model):
    """A renter adding money to the wallet; credited only when Stripe says the payment succeeded."""

    class State(models.TextChoices):
        CREATED = "created"  # the PaymentIntent is on its way to Stripe (outbox)
        AWAITING_PAYMENT = "awaiting_payment"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    renter = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="top_ups")
    amount_minor = models.PositiveIntegerField(help_text="In the currency's minor unit (cents).")
    currency = models.CharField(max_length=3, default="usd")
    state = models.CharField(max_length=20, choices=State.choices, default=State.CREATED)
    outbox = models.ForeignKey(OutboxMessage, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    payment_intent_id = models.CharField(max_length=64, blank=True, db_index=True)
    client_secret = models.CharField(max_length=255, blank=True)
    credited = models.ForeignKey(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="top_ups"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.CheckConstraint(condition=Q(amount_minor__gt=0), name="top_up_positive")]

    def __str__(self) -> str:
        return f"top-up {self.id} ({self.state})"


class WebhookEvent(models.Model):
    """A Stripe event, stored once per event id when its signature checked out, and processed
    afterwards by re-reading the object it names."""

    event_id = models.CharField(max_length=64, unique=True)
    type = models.CharField(max_length=80)
    account = models.CharField(max_length=64, blank=True, help_text="The Connect account; empty for the platform.")
    payload = models.JSONField()
    received_at = models.DateTimeField(default=timezone.now)
    processed_at = models.DateTimeField(null=True, blank=True)
    # Given up: the event cannot be processed (malformed), or still could not after the most
    # attempts; last_error says why, and nothing retries it.
    failed_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["received_at"]

    def __str__(self) -> str:
        return f"{self.type} {self.event_id}"


class RatingClock(models.Model):
    """When the usage-rating sweep last succeeded (one row). The next sweep rates what arrived
    since then, so a sweep lost to an outage (database, broker, workers) is made up by the next."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    rated_from = models.DateTimeField(help_text="The start of the last sweep that succeeded.")

    def __str__(self) -> str:
        return f"rated from {self.rated_from:%Y-%m-%d %H:%M:%S}"
