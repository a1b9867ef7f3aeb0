from django.contrib import admin, messages

from marketplace.kernel.errors import StateConflict
from nodes import services
from nodes.models import GPU, EnrolmentToken, Slice, Unit

LOCATION_EVIDENCE = [
    "location_verified", "observed_ip", "observed_country", "observed_at",
    "attested_country", "attested_subdivision", "attested_by", "attested_at",
]  # fmt: skip


OWNER_POLICY = [
    "price_per_gpu_hour_micros", "isolation_levels", "workload_classes", "renters_accepted",
    "interruptible_price_percent", "max_job_duration_s", "availability", "time_zone", "reliability",
]  # fmt: skip


class GPUInline(admin.TabularInline):
    model = GPU
    extra = 0
    readonly_fields = [
        "index", "device_uuid", "model", "vram_mb", "driver_version", "cuda_version", "healthy", "present"
    ]  # fmt: skip


@admin.register(Unit)
class UnitAdmin(admin.ModelAdmin):
    list_display = [
        "name", "owner", "country", "subdivision", "location_verified", "observed_country", "status",
        "last_heartbeat_at", "price_per_gpu_hour_micros", "reliability",
    ]  # fmt: skip
    list_filter = ["status", "location_verified", "country", ("review_since", admin.EmptyFieldListFilter)]
    search_fields = ["name", "owner__username", "hostname", "observed_ip"]
    readonly_fields = [
        "id", "credential_lookup", "enrolled_at", "last_heartbeat_at", "agent_version", "hostname",
        *LOCATION_EVIDENCE, "agent_country", "review_since", "review_reason", "implausible_reports",
        "implausible_since", "capacity_version", "capacity_changed_at",
    ]  # fmt: skip
    exclude = ["credential_digest"]
    inlines = [GPUInline]
    actions = ["attest_location", "revoke_attestation", "clear_review", "drain", "resume"]

    def get_readonly_fields(self, request, obj=None):
        return [*super().get_readonly_fields(request, obj), "reliability"]  # computed from allocations

    def get_fieldsets(self, request, obj=None):
        """Every field as Django lists them, with the owner's placement policy in its own group."""
        fields = [f for f in super().get_fieldsets(request, obj)[0][1]["fields"] if f not in OWNER_POLICY]
        return [(None, {"fields": fields}), ("Owner policy", {"fields": OWNER_POLICY})]

    def save_model(self, request, obj, form, change):
        # Edits go through the service, so policy changes are checked and audited like the
        # owner's own, and placement hears of every change.
        if not change:
            return super().save_model(request, obj, form, change)
        actor = f"user:{request.user.pk}"
        services.unit_staff_edit(unit=obj, changed=form.changed_data, previous=form.initial, actor=actor)

    @admin.action(description="Attest declared location", permissions=["change"])
    def attest_location(self, request, queryset):
        for unit in queryset:
            services.unit_location_attest(unit=unit, by=request.user)
        verified = queryset.filter(location_verified=True).count()
        self.message_user(request, f"Attested {len(queryset)} unit(s); {verified} verified now.", messages.SUCCESS)

    @admin.action(description="Clear review (take jobs again)", permissions=["change"])
    def clear_review(self, request, queryset):
        cleared = sum(services.unit_review_clear(unit=unit, actor=f"user:{request.user.pk}") for unit in queryset)
        self.message_user(request, f"Cleared the review of {cleared} unit(s).", messages.SUCCESS)

    @admin.action(description="Drain (no new work; running jobs finish)", permissions=["change"])
    def drain(self, request, queryset):
        # Stopping the running jobs as well is the jobs app's: manage.py unit_drain --stop-jobs.
        for unit in queryset:
            try:
                unit = services.unit_drain(unit=unit, actor=f"user:{request.user.pk}")
            except StateConflict as error:
                self.message_user(request, f"{unit}: {error.detail}", messages.ERROR)
            else:
                self.message_user(request, f"{unit}: {unit.get_status_display().lower()}.", messages.SUCCESS)

    @admin.action(description="Resume after a drain", permissions=["change"])
    def resume(self, request, queryset):
        for unit in queryset:
            unit = services.unit_resume(unit=unit, actor=f"user:{request.user.pk}")
            self.message_user(request, f"{unit}: {unit.get_status_display().lower()}.", messages.SUCCESS)

    @admin.action(description="Revoke location attestation", permissions=["change"])
    def revoke_attestation(self, request, queryset):
        for unit in queryset:
            services.unit_location_attestation_revoke(unit=unit, by=request.user)
        self.message_user(request, f"Revoked the attestation of {len(queryset)} unit(s).", messages.SUCCESS)


@admin.register(EnrolmentToken)
class EnrolmentTokenAdmin(admin.ModelAdmin):
    list_display = ["lookup", "unit", "created_at", "expires_at", "used_at"]
    exclude = ["digest"]
    readonly_fields = ["lookup", "unit", "created_at", "used_at"]


@admin.register(Slice)
class SliceAdmin(admin.ModelAdmin):
    list_display = ["id", "unit", "gpu", "kind", "isolation", "price_per_gpu_hour_micros", "advertised"]
    list_filter = ["kind", "isolation", "advertised"]
