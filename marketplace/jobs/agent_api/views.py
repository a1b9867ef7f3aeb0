"""The node agent API over HTTP: each view parses the request, calls its use case in
``marketplace/jobs/agent_use_cases.py`` and serialises the answer."""

from django.conf import settings
from django.utils.cache import add_never_cache_headers
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.jobs import agent_use_cases as use_cases
from marketplace.jobs.agent_api import serializers as s
from marketplace.jobs.agent_api.auth import (
    STREAM_CALL,
    IsUnitAgent,
    NodeCredentialAuthentication,
    UnitHeartbeatThrottle,
    UnitRateThrottle,
    enrol_failures,
)
from marketplace.kernel import metrics
from marketplace.kernel.addresses import client_address
from marketplace.kernel.api.longpoll import LongPollMixin, long_poll, wait_slots_take
from marketplace.kernel.api.params import query_int
from marketplace.kernel.errors import DomainError

MAX_WAIT_S = 60  # what the query may say; the server waits at most ASSIGNMENT_LONG_POLL_MAX_S

NO_STORE = {"Cache-Control": "no-store"}


def valid(serializer_class, data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class EnrolView(APIView):
    """Unauthenticated: the token is the credential. Failed enrolments are counted per address,
    and an address with ENROL_FAILURE_LIMIT of them is refused with a 429 until they age out,
    its right tokens included, so guessing tokens costs an attacker a cool-off per handful."""

    authentication_classes: list = []
    permission_classes: list = []
    throttle_classes: list = []

    @extend_schema(
        request=s.EnrolSerializer,
        responses={
            201: s.EnrolResultSerializer,
            401: OpenApiResponse(description="problem+json: the enrolment token is not valid"),
            409: OpenApiResponse(description="problem+json: the enrolment token was used already"),
            410: OpenApiResponse(description="problem+json: the enrolment token has expired"),
            429: OpenApiResponse(description="problem+json: too many failed enrolments from this address"),
        },
    )
    def post(self, request):
        address = client_address(request)
        failures = enrol_failures()
        if wait := failures.wait_s(address):
            raise exceptions.Throttled(
                wait, detail="Too many failed enrolments from this address; try again after Retry-After seconds."
            )
        try:
            body = use_cases.agent_enrol(**valid(s.EnrolSerializer, request.data), address=address)
        except (DomainError, exceptions.ValidationError):
            failures.count(address)
            raise
        # The node credential is in this answer and nowhere else: no cache may keep it.
        return Response(s.EnrolResultSerializer(body).data, status=status.HTTP_201_CREATED, headers=NO_STORE)


class AgentView(APIView):
    """Base for calls made with a node credential; ``self.unit`` is the caller's own unit."""

    authentication_classes = [NodeCredentialAuthentication]
    permission_classes = [IsUnitAgent]
    throttle_classes = [UnitRateThrottle]

    @property
    def unit(self):
        return self.request.user.unit

    def own_allocation(self, allocation_id):
        return use_cases.agent_allocation(unit=self.unit, allocation_id=allocation_id)


class HeartbeatView(AgentView):
    throttle_classes = [UnitHeartbeatThrottle]  # a budget of its own: reports cannot starve heartbeats

    @extend_schema(request=s.HeartbeatSerializer, responses={200: s.HeartbeatResultSerializer})
    def post(self, request):
        beat = valid(s.HeartbeatSerializer, request.data)
        body = use_cases.agent_heartbeat(unit=self.unit, beat=beat, address=client_address(request))
        if not request.META.get(STREAM_CALL):  # a stream's heartbeats are counted by its server
            metrics.HEARTBEATS.labels("http", "full").inc()
        return Response(s.HeartbeatResultSerializer(body).data)


class NextAssignmentView(LongPollMixin, AgentView):
    @extend_schema(
        parameters=[
            OpenApiParameter(
                "wait",
                {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_S},
                description="Seconds to wait for work (long poll), at most ASSIGNMENT_LONG_POLL_MAX_S; a unit holds "
                "at most LONG_POLL_WAITS_PER_UNIT waits at a time, beyond which this answers at once.",
            )
        ],
        responses={200: s.AssignmentSerializer, 204: OpenApiResponse(description="No work now.")},
    )
    @long_poll
    def get(self, request):
        wait = min(query_int(request.query_params, "wait", default=0, minimum=0, maximum=MAX_WAIT_S),
                   settings.ASSIGNMENT_LONG_POLL_MAX_S)  # fmt: skip
        unit = self.unit

        def answer():
            body = use_cases.agent_assignment_next(unit=unit)
            if body is None:
                return Response(status=status.HTTP_204_NO_CONTENT)
            return Response(s.AssignmentSerializer(body).data)

        if wait and not use_cases.agent_assignment_waiting(unit=unit):
            slots = wait_slots_take({f"unit:{unit.pk}": settings.LONG_POLL_WAITS_PER_UNIT}, seconds=wait)
            if slots is not None:  # beyond the cap: answer at once
                return self.wait_for(
                    seconds=wait,
                    ready=lambda: use_cases.agent_assignment_waiting(unit=unit),
                    answer=answer,
                    interval_s=use_cases.POLL_INTERVAL_S,
                    slots=slots,
                )
        return answer()


class AllocationStartView(AgentView):
    @extend_schema(
        request=s.StartSerializer,
        responses={
            200: s.JobStateSerializer,
            409: OpenApiResponse(description="problem+json: the job is past starting (cancelled, ended)"),
        },
    )
    def post(self, request, allocation_id):
        allocation = self.own_allocation(allocation_id)
        started = valid(s.StartSerializer, request.data if request.data else {})
        return Response(use_cases.agent_allocation_start(allocation=allocation, **started))


class AllocationSecretsView(AgentView):
    @extend_schema(
        request=None,
        responses={
            200: s.SecretsSerializer,
            409: OpenApiResponse(
                description="problem+json: the allocation has ended (the job was cancelled meanwhile), or a secret "
                "it names is gone or unreadable (the job has failed with that reason): do not start it"
            ),
        },
    )
    def post(self, request, allocation_id):
        response = Response(use_cases.agent_allocation_secrets(allocation=self.own_allocation(allocation_id)))
        add_never_cache_headers(response)
        return response


class AllocationStagingView(AgentView):
    @extend_schema(
        request=s.StagingSerializer,
        responses={
            200: OpenApiResponse(description='{"recorded": true}'),
            409: OpenApiResponse(description="problem+json: the allocation has ended"),
            422: OpenApiResponse(description="problem+json: a path the job did not declare"),
        },
    )
    def post(self, request, allocation_id):
        allocation = self.own_allocation(allocation_id)
        report = valid(s.StagingSerializer, request.data)
        return Response(use_cases.agent_allocation_staging(allocation=allocation, **report))


class AllocationUsageView(AgentView):
    @extend_schema(
        request=s.UsageSerializer,
        responses={
            200: s.UsageResultSerializer,
            409: OpenApiResponse(
                description="problem+json, type usage-allocation-ended or usage-after-release: the allocation "
                "was released too long ago, or a sample was recorded after its release. Drop the batch."
            ),
            422: OpenApiResponse(
                description="problem+json, type usage-recorded-outside-allocation or usage-exceeds-gpu-time: "
                "the batch is implausible. Nothing of it is stored; drop it."
            ),
        },
    )
    def post(self, request, allocation_id):
        allocation = self.own_allocation(allocation_id)
        samples = valid(s.UsageSerializer, request.data)["samples"]
        return Response(use_cases.agent_allocation_usage(allocation=allocation, samples=samples))


class AllocationLogsView(AgentView):
    @extend_schema(request=s.LogChunkSerializer, responses={200: s.LogChunkResultSerializer})
    def post(self, request, allocation_id):
        allocation = self.own_allocation(allocation_id)
        chunk = valid(s.LogChunkSerializer, request.data)
        return Response(use_cases.agent_allocation_logs(allocation=allocation, **chunk))


class AllocationFinishView(AgentView):
    @extend_schema(request=s.FinishSerializer, responses={200: s.JobStateSerializer})
    def post(self, request, allocation_id):
        allocation = self.own_allocation(allocation_id)
        finish = valid(s.FinishSerializer, request.data)
        return Response(use_cases.agent_allocation_finish(allocation=allocation, **finish))
