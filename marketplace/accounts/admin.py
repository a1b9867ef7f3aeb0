from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin

from marketplace.accounts import services
from marketplace.accounts.models import ApiKey, RenterProfile, Secret, User

admin.site.register(User, UserAdmin)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "lookup", "created_at", "expires_at", "revoked_at", "last_used_at"]
    exclude = ["digest"]
    readonly_fields = ["lookup", "last_used_at"]

    def has_add_permission(self, request) -> bool:
        # A key's secret must be shown once to its owner: create keys with `manage.py api_key`.
        return False


@admin.register(Secret)
class SecretAdmin(admin.ModelAdmin):
    """Names and dates only: a secret's value is never shown, not even sealed."""

    list_display = ["name", "owner", "created_at", "updated_at"]
    search_fields = ["name", "owner__username"]
    fields = ["owner", "name", "created_at", "updated_at"]
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return False  # set by their owners, through the API or the CLI

    def has_change_permission(self, request, obj=None) -> bool:
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
        verified = services.renters_verify(profiles=queryset, actor=f"user:{request.user.pk}")
        self.message_user(request, f"Verified {verified} renter(s).", messages.SUCCESS)
