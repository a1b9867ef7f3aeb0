from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from marketplace.kernel.api.auth import bearer_token
from marketplace.kernel.api.throttling import SharedRateThrottle
from marketplace.kernel.logcontext import log_bind
from marketplace.kernel.ratelimit import Limiter
from nodes.models import Unit
from nodes.services import NODE_CREDENTIAL_KIND, unit_authenticate


class UnitAgent:
    """The principal behind a node credential: it may act for its own unit and nothing else."""

    is_authenticated = True
    is_staff = False
    is_active = True

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self.pk = None

    def __str__(self) -> str:
        return f"agent of unit {self.unit.pk}"


class NodeCredentialAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        token = bearer_token(request)
        if token is None:
            return None
        if not token.startswith(f"{NODE_CREDENTIAL_KIND}_"):
            raise exceptions.AuthenticationFailed("This endpoint takes a node credential (shs_node_...).")
        unit = unit_authenticate(credential=token)
        if unit is None:
            raise exceptions.AuthenticationFailed("Unknown or replaced node credential; enrol the agent again.")
        log_bind(unit=unit.pk)  # for the rest of the request (ObservedRequestMiddleware undoes it)
        return UnitAgent(unit), unit

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="agent"'


class IsUnitAgent(permissions.BasePermission):
    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, UnitAgent)


# Set in the WSGI environ of a call that came over the agent's stream (marketplace/jobs/
# agent_stream/calls.py). A client cannot set it: the headers it sends all become HTTP_* keys.
STREAM_CALL = "shedshare.stream_call"


class UnitRateThrottle(SharedRateThrottle):
    """Counts each unit's agent calls (the unit, not the address: many sheds share a NAT).

    Calls over the stream are left to the stream's own budget (STREAM_FRAMES_PER_S a second,
    stricter than AGENT_RATE_LIMIT), which is kept in memory: counting them here as well would
    cost two round trips to the cache on every report."""

    scope = "agent"
    setting = "AGENT_RATE_LIMIT"
    counts_stream_calls = False

    def ident(self, request, view) -> str | None:
        if not isinstance(request.user, UnitAgent):
            return None
        if request.META.get(STREAM_CALL) and not self.counts_stream_calls:
            return None
        return f"unit:{request.user.unit.pk}"


class UnitHeartbeatThrottle(UnitRateThrottle):
    """Heartbeats have a budget of their own. Over the stream only the full ones reach it (a
    heartbeat that changes nothing is answered from memory), and those write: counted."""

    scope = "agent-heartbeat"
    setting = "AGENT_HEARTBEAT_RATE_LIMIT"
    counts_stream_calls = True


def enrol_failures() -> Limiter:
    """Failed enrolments per address (see EnrolView)."""
    return Limiter("enrol-failures", settings.ENROL_FAILURE_LIMIT)


class NodeCredentialScheme(OpenApiAuthenticationExtension):
    target_class = "marketplace.jobs.agent_api.auth.NodeCredentialAuthentication"
    name = "NodeCredential"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A unit's node credential, shs_node_..."}
