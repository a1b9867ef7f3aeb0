import stripe
from django.contrib import admin
from django.core.exceptions import ImproperlyConfigured

from billing import outbox, payouts, topups, webhooks
from billing.models import Account, BillingProfile, LedgerEntry, LedgerTransaction, OutboxMessage, TopUp, WebhookEvent
from marketplace.jobs.models import UsageSample
from marketplace.kernel.admin import ReadOnlyAdmin
from marketplace.kernel.errors import DomainError

# Ledger rows are immutable (ReadOnlyAdmin); corrections are new postings made through the services.
# The Stripe rows change only through their services too: the actions below call them, for staff
# with the model's change permission, and each records its operator in the audit log.

# What an action that calls Stripe reports as a refusal rather than a server error.
STRIPE_REFUSED = (DomainError, stripe.StripeError, ImproperlyConfigured)


class LedgerEntryInline(admin.TabularInline):
    model = LedgerEntry
    extra = 0
    can_delete = False
    readonly_fields = ["account", "amount_micros"]


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "kind", "key", "allocation"]
    list_filter = ["kind"]
    inlines = [LedgerEntryInline]


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ["kind", "user", "currency"]


@admin.register(UsageSample)
class UsageSampleAdmin(ReadOnlyAdmin):
    list_display = ["allocation", "seq", "gpu_ms", "recorded_at", "received_at"]


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "operation", "state", "attempts", "next_attempt_at", "error", "user", "stripe_id"]
    list_filter = ["state", "operation"]
    search_fields = ["=id", "=stripe_id", "user__username"]
    date_hierarchy = "created_at"
    actions = ["retry_now", "cancel"]

    @admin.display(description="last error")
    def error(self, message: OutboxMessage) -> str:
        return message.last_error[:120]

    @admin.action(description="Retry now (failed or backing off)", permissions=["operate"])
    def retry_now(self, request, queryset):
        def retry(message, actor):
            outbox.outbox_retry(message_id=message.pk, actor=actor)
            return "queued to send now."

        self.act_on_each(request, queryset, retry)

    @admin.action(description="Cancel (only unsent rows that move no money)", permissions=["operate"])
    def cancel(self, request, queryset):
        def cancel(message, actor):
            outbox.outbox_cancel(message_id=message.pk, actor=actor)
            return "cancelled."

        self.act_on_each(request, queryset, cancel)


class WebhookStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("person", "Needs a person"), ("waiting", "Waiting"), ("processed", "Processed")]

    def queryset(self, request, queryset):
        if self.value() == "person":
            return queryset.filter(failed_at__isnull=False)
        if self.value() == "waiting":
            return queryset.filter(processed_at__isnull=True, failed_at__isnull=True)
        if self.value() == "processed":
            return queryset.filter(processed_at__isnull=False)
        return queryset


@admin.register(WebhookEvent)
class WebhookEventAdmin(ReadOnlyAdmin):
    list_display = ["received_at", "type", "event_id", "account", "status", "attempts", "error"]
    list_filter = [WebhookStatusFilter, "type"]
    search_fields = ["=event_id", "=account"]
    date_hierarchy = "received_at"
    actions = ["replay"]

    @admin.display(description="status")
    def status(self, event: WebhookEvent) -> str:
        if event.processed_at is not None:
            return "processed"
        return "needs a person" if event.failed_at is not None else "waiting"

    @admin.display(description="last error")
    def error(self, event: WebhookEvent) -> str:
        return event.last_error[:120]

    @admin.action(description="Replay (process again; never credits twice)", permissions=["operate"])
    def replay(self, request, queryset):
        def replay(event, actor):
            event = webhooks.webhook_replay(event_id=event.event_id, actor=actor)
            if event.processed_at is not None:
                return "processed."
            return f"not processed ({event.last_error[:200]}); {self.status(event)}."

        self.act_on_each(request, queryset, replay, refused=STRIPE_REFUSED)


@admin.register(TopUp)
class TopUpAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "renter", "amount_minor", "currency", "state", "payment_intent_id", "credited"]
    list_filter = ["state"]
    search_fields = ["=id", "=payment_intent_id", "renter__username"]
    exclude = ["client_secret"]  # the renter's to pay with, no one else's to see
    date_hierarchy = "created_at"
    actions = ["refresh_from_stripe"]

    @admin.action(description="Resend / refresh from Stripe", permissions=["operate"])
    def refresh_from_stripe(self, request, queryset):
        def refresh(topup, actor):
            return f"{topups.topup_refresh(topup=topup, actor=actor).state}."

        self.act_on_each(request, queryset, refresh, refused=STRIPE_REFUSED)


@admin.register(BillingProfile)
class BillingProfileAdmin(ReadOnlyAdmin):
    list_display = [
        "user", "stripe_customer_id", "stripe_account_id", "payouts_enabled", "details_submitted", "disabled_reason",
        "postpaid",
    ]  # fmt: skip
    list_filter = ["payouts_enabled", "details_submitted", "postpaid"]
    search_fields = ["user__username", "=stripe_customer_id", "=stripe_account_id"]
    actions = ["sync_from_stripe"]

    @admin.action(description="Sync Connect account from Stripe", permissions=["operate"])
    def sync_from_stripe(self, request, queryset):
        def sync(profile, actor):
            profile = payouts.billing_profile_sync(profile=profile, actor=actor)
            return "payouts enabled." if profile.payouts_enabled else "payouts not enabled."

        self.act_on_each(request, queryset.select_related("user"), sync, refused=STRIPE_REFUSED)
