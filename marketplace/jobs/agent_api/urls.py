from django.urls import path

from marketplace.jobs.agent_api import views
from nodes.agent import protocol


def allocation(action: str) -> str:
    return protocol.allocation_path("<uuid:allocation_id>", action)


app_name = "agent"
urlpatterns = [
    path(protocol.ENROL, views.EnrolView.as_view(), name="enrol"),
    path(protocol.HEARTBEAT, views.HeartbeatView.as_view(), name="heartbeat"),
    path(protocol.NEXT_ASSIGNMENT, views.NextAssignmentView.as_view(), name="assignment-next"),
    path(allocation("start"), views.AllocationStartView.as_view(), name="allocation-start"),
    path(allocation("secrets"), views.AllocationSecretsView.as_view(), name="allocation-secrets"),
    path(allocation("staging"), views.AllocationStagingView.as_view(), name="allocation-staging"),
    path(allocation("usage"), views.AllocationUsageView.as_view(), name="allocation-usage"),
    path(allocation("logs"), views.AllocationLogsView.as_view(), name="allocation-logs"),
    path(allocation("finish"), views.AllocationFinishView.as_view(), name="allocation-finish"),
]
