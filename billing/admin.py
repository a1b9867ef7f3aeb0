from django.contrib import admin

from billing.models import Account, LedgerEntry, LedgerTransaction
from marketplace.jobs.models import UsageSample
from marketplace.kernel.admin import ReadOnlyAdmin

# Ledger rows are immutable (ReadOnlyAdmin); corrections are new postings made through the services.


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
