from django.contrib import admin

from marketplace.models import Allocation, ApiKey, AuditEvent, Job, Lease


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "renter", "state", "gpu_count", "isolation", "created_at"]
    list_filter = ["state", "isolation"]
    search_fields = ["id", "renter__username", "name"]
    readonly_fields = ["pending_reason", "attempts", "exit_code", "placed_at", "started_at", "finished_at"]


class LeaseInline(admin.TabularInline):
    model = Lease
    extra = 0
    readonly_fields = ["slice", "released_at"]
    can_delete = False


@admin.register(Allocation)
class AllocationAdmin(admin.ModelAdmin):
    list_display = ["id", "job", "unit", "price_per_gpu_hour_micros", "created_at", "released_at"]
    readonly_fields = [f.name for f in Allocation._meta.fields]
    inlines = [LeaseInline]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "lookup", "created_at", "expires_at", "revoked_at", "last_used_at"]
    exclude = ["digest"]
    readonly_fields = ["lookup", "last_used_at"]

    def has_add_permission(self, request) -> bool:
        # A key's secret must be shown once to its owner: create keys with `manage.py api_key`.
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["created_at", "action", "subject_id", "actor"]
    list_filter = ["action"]
    search_fields = ["subject_id"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
