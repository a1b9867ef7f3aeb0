from django.contrib import admin, messages

from marketplace.jobs import services
from marketplace.jobs.models import Allocation, Job, Lease
from marketplace.kernel.admin import ReadOnlyAdmin
from marketplace.kernel.errors import StateConflict


# Jobs and allocations change only through their services (a state set by hand would leave
# leases held).
@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = ["id", "renter", "state", "gpu_count", "isolation", "created_at"]
    list_filter = ["state", "isolation"]
    search_fields = ["id", "renter__username", "name"]
    actions = ["cancel_jobs"]

    @admin.action(description="Cancel selected jobs", permissions=["view"])
    def cancel_jobs(self, request, queryset):
        cancelled = 0
        for job in queryset.exclude(state__in=Job.FINAL_STATES):
            try:
                services.job_cancel(job=job, actor=f"user:{request.user.pk}")
                cancelled += 1
            except StateConflict:
                continue  # it ended meanwhile
        self.message_user(request, f"Cancelled {cancelled} job(s).", messages.SUCCESS)


class LeaseInline(admin.TabularInline):
    model = Lease
    extra = 0
    readonly_fields = ["slice", "released_at"]
    can_delete = False


@admin.register(Allocation)
class AllocationAdmin(ReadOnlyAdmin):
    list_display = ["id", "job", "unit", "price_per_gpu_hour_micros", "created_at", "released_at"]
    inlines = [LeaseInline]
