from django.contrib import admin

from nodes.models import GPU, EnrolmentToken, Slice, Unit


class GPUInline(admin.TabularInline):
    model = GPU
    extra = 0
    readonly_fields = [
        "index", "device_uuid", "model", "vram_mb", "driver_version", "cuda_version", "healthy", "present"
    ]  # fmt: skip


@admin.register(Unit)
class UnitAdmin(admin.ModelAdmin):
    list_display = ["name", "owner", "country", "status", "last_heartbeat_at", "price_per_gpu_hour_micros"]
    list_filter = ["status", "country"]
    search_fields = ["name", "owner__username", "hostname"]
    readonly_fields = ["id", "credential_lookup", "enrolled_at", "last_heartbeat_at", "agent_version", "hostname"]
    exclude = ["credential_digest"]
    inlines = [GPUInline]


@admin.register(EnrolmentToken)
class EnrolmentTokenAdmin(admin.ModelAdmin):
    list_display = ["lookup", "unit", "created_at", "expires_at", "used_at"]
    exclude = ["digest"]
    readonly_fields = ["lookup", "unit", "created_at", "used_at"]


@admin.register(Slice)
class SliceAdmin(admin.ModelAdmin):
    list_display = ["id", "unit", "gpu", "kind", "isolation", "price_per_gpu_hour_micros", "advertised"]
    list_filter = ["kind", "isolation", "advertised"]
