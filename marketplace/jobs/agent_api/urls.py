from django.urls import path

from marketplace.jobs.agent_api import views

app_name = "agent"
urlpatterns = [
    path("enrol", views.EnrolView.as_view(), name="enrol"),
    path("heartbeat", views.HeartbeatView.as_view(), name="heartbeat"),
    path("assignments/next", views.NextAssignmentView.as_view(), name="assignment-next"),
    path("allocations/<uuid:allocation_id>/start", views.AllocationStartView.as_view(), name="allocation-start"),
    path("allocations/<uuid:allocation_id>/usage", views.AllocationUsageView.as_view(), name="allocation-usage"),
    path("allocations/<uuid:allocation_id>/logs", views.AllocationLogsView.as_view(), name="allocation-logs"),
    path("allocations/<uuid:allocation_id>/finish", views.AllocationFinishView.as_view(), name="allocation-finish"),
]
