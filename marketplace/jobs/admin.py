from django.contrib import admin

from marketplace.jobs.models import Allocation, Job, Lease


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
