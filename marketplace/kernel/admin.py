from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.http import JsonResponse
from django.urls import reverse
from django.utils.html import format_html

from marketplace.kernel.errors import DomainError
from marketplace.kernel.models import AuditEvent


class ReadOnlyAdmin(admin.ModelAdmin):
    """For rows that change only through their services (jobs, allocations, the ledger): the
    admin shows them, and offers actions that call the services where there are any."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_operate_permission(self, request) -> bool:
        """Who may run the actions marked ``permissions=["operate"]``: staff holding the model's
        change permission. The rows stay read-only in the form; the actions call the services."""
        return request.user.has_perm(f"{self.opts.app_label}.{get_permission_codename('change', self.opts)}")

    def act_on_each(self, request, rows, act, *, refused=(DomainError,)) -> None:
        """Call ``act(row, actor)`` (a service, with the admin user as the actor) for each row and
        report each outcome: what ``act`` returns, or why the service refused (``refused``)."""
        actor = f"user:{request.user.pk}"
        for row in rows:
            try:
                outcome = act(row, actor)
            except refused as error:
                self.message_user(request, f"{row}: {getattr(error, 'detail', None) or error}", messages.ERROR)
            else:
                self.message_user(request, f"{row}: {outcome}", messages.SUCCESS)


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
        url = f"{reverse('admin:kernel_auditevent_changelist')}?subject_id={event.subject_id}"
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
