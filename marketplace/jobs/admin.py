from django.contrib import admin
from django.db.models import OuterRef, Subquery

from marketplace.jobs import services
from marketplace.jobs.models import Allocation, Job, Lease
from marketplace.kernel.admin import ReadOnlyAdmin


# Jobs and allocations change only through their services (a state set by hand would leave
# leases held); the actions call them, for staff with the change permission on jobs.
@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = ["id", "renter", "state", "unit", "gpu_count", "isolation", "attempts", "created_at"]
    list_filter = ["state", "isolation"]
    search_fields = ["id", "renter__username", "name", "allocations__unit__name"]
    date_hierarchy = "created_at"
    actions = ["cancel_jobs", "requeue_jobs"]

    def get_queryset(self, request):
        latest = Allocation.objects.filter(job=OuterRef("pk")).order_by("-created_at").values("unit__name")[:1]
        return super().get_queryset(request).select_related("renter").annotate(unit_name=Subquery(latest))

    @admin.display(description="unit (latest)", ordering="unit_name")
    def unit(self, job: Job) -> str:
        return job.unit_name or "-"

    @admin.action(description="Cancel selected jobs", permissions=["operate"])
    def cancel_jobs(self, request, queryset):
        def cancel(job, actor):
            return f"{services.job_cancel(job=job, actor=actor).state}."

        self.act_on_each(request, queryset, cancel)

    @admin.action(description="Requeue (lost, stopped by the platform, or never picked up)", permissions=["operate"])
    def requeue_jobs(self, request, queryset):
        def requeue(job, actor):
            return f"{services.job_requeue(job=job, actor=actor).state}."

        self.act_on_each(request, queryset, requeue)


class LeaseInline(admin.TabularInline):
    model = Lease
    extra = 0
    readonly_fields = ["slice", "released_at"]
    can_delete = False


@admin.register(Allocation)
class AllocationAdmin(ReadOnlyAdmin):
    list_display = ["id", "job", "unit", "price_per_gpu_hour_micros", "created_at", "released_at"]
    inlines = [LeaseInline]
