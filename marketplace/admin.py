from django.contrib import admin, messages
from django.http import JsonResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from marketplace.models import Allocation, ApiKey, AuditEvent, Job, Lease, RenterProfile


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
    list_display = ["created_at", "action", "subject", "actor"]
    list_filter = ["action"]
    search_fields = ["=subject_id", "actor"]
    date_hierarchy = "created_at"
    actions = ["export_json"]

    @admin.display(description="subject", ordering="subject_id")
    def subject(self, event):
        # A link that narrows the list to this subject: one job's or one unit's whole trail.
        url = f"{reverse('admin:marketplace_auditevent_changelist')}?subject_id={event.subject_id}"
        return format_html('<a href="{}">{}</a>', url, event.subject_id)

    @admin.action(description="Export selected events as JSON")
    def export_json(self, request, queryset):
        events = [
            {
                "id": event.pk,
                "created_at": event.created_at.isoformat(),
                "action": event.action,
                "subject_id": str(event.subject_id),
                "actor": event.actor,
                "data": event.data,
            }
            for event in queryset.order_by("created_at", "id")
        ]
        response = JsonResponse(events, safe=False, json_dumps_params={"indent": 2})
        response["Content-Disposition"] = 'attachment; filename="audit-events.json"'
        return response

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(RenterProfile)
class RenterProfileAdmin(admin.ModelAdmin):
    list_display = ["user", "verified_at"]
    list_filter = [("verified_at", admin.EmptyFieldListFilter)]
    search_fields = ["user__username", "user__email"]
    readonly_fields = ["verified_at"]
    actions = ["verify_renter"]

    @admin.action(description="Verify renter", permissions=["change"])
    def verify_renter(self, request, queryset):
        # Keep the first verification time of renters verified already.
        verified = queryset.filter(verified_at__isnull=True).update(verified_at=timezone.now())
        self.message_user(request, f"Verified {verified} renter(s).", messages.SUCCESS)
