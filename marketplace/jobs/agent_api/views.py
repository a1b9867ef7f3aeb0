import time

from django.conf import settings
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.jobs import jurisdictions
from marketplace.jobs import services as market
from marketplace.jobs.agent_api import serializers as s
from marketplace.jobs.agent_api.auth import IsUnitAgent, NodeCredentialAuthentication
from marketplace.jobs.models import Allocation
from marketplace.jobs.usage import SampleReport, usage_record
from nodes import services


def client_address(request) -> str:
    """The address the caller connected from. Behind TRUSTED_PROXY_COUNT proxies it is the
    entry that many hops from the right of X-Forwarded-For: the hops left of it were written by
    the caller and prove nothing."""
    hops = settings.TRUSTED_PROXY_COUNT
    if hops > 0:
        forwarded = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
        return forwarded[-hops] if len(forwarded) >= hops else ""
    return request.META.get("REMOTE_ADDR", "")


class EnrolView(APIView):
    authentication_classes: list = []
    permission_classes: list = []

    @extend_schema(
        request=s.EnrolSerializer,
        responses={
            201: s.EnrolResultSerializer,
            401: OpenApiResponse(description="problem+json: the enrolment token is not valid"),
            409: OpenApiResponse(description="problem+json: the enrolment token was used already"),
            410: OpenApiResponse(description="problem+json: the enrolment token has expired"),
        },
    )
    def post(self, request):
        data = s.EnrolSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        unit, credential = services.unit_enrol(
            token=data.validated_data["token"],
            hostname=data.validated_data["hostname"],
            agent_version=data.validated_data["agent_version"],
            address=client_address(request),
        )
        body = {"unit_id": unit.pk, "credential": credential, "heartbeat_interval_s": settings.HEARTBEAT_INTERVAL_S}
        return Response(s.EnrolResultSerializer(body).data, status=status.HTTP_201_CREATED)


class AgentView(APIView):
    """Base for calls made with a node credential; ``self.unit`` is the caller's own unit."""

    authentication_classes = [NodeCredentialAuthentication]
    permission_classes = [IsUnitAgent]

    @property
    def unit(self):
        return self.request.user.unit

    def valid(self, serializer_class) -> dict:
        data = serializer_class(data=self.request.data)
        data.is_valid(raise_exception=True)
        return data.validated_data

    def own_allocation(self, allocation_id) -> Allocation:
        # Scoped to the caller's unit: another unit's allocation is indistinguishable from none.
        return get_object_or_404(Allocation.objects.select_related("job"), pk=allocation_id, unit=self.unit)


class HeartbeatView(AgentView):
    @extend_schema(request=s.HeartbeatSerializer, responses={200: s.HeartbeatResultSerializer})
    def post(self, request):
        beat = self.valid(s.HeartbeatSerializer)
        gpus = [services.gpu_report(gpu) for gpu in beat["gpus"]]
        if services.unit_heartbeat(
            unit=self.unit,
            gpus=gpus,
            agent_version=beat["agent_version"],
            advertise=beat["advertise"],
            limits=beat["limits"],
            address=client_address(request),
        ):
            market.placement_request()
        running = beat["running"]
        market.allocations_reconcile(unit=self.unit, running_ids=running)
        cancel = market.allocations_to_cancel(unit=self.unit, running_ids=running)
        body = {
            "status": self.unit.status,
            "heartbeat_interval_s": settings.HEARTBEAT_INTERVAL_S,
            "cancel": cancel,
            "preempt": market.allocations_to_preempt(unit=self.unit, running_ids=running),
            "policy": services.unit_policy(self.unit),
        }
        return Response(s.HeartbeatResultSerializer(body).data)


def assignment_body(allocation: Allocation) -> dict:
    job = allocation.job
    gpus = [
        {
            "index": lease.slice.gpu.index,
            "uuid": lease.slice.device_uuid,
            "gpu_uuid": lease.slice.gpu.device_uuid,
            "kind": lease.slice.kind,
            "share": lease.slice.share_index,
        }
        for lease in allocation.leases.select_related("slice__gpu").order_by("slice__gpu__index", "slice__share_index")
    ]
    return {
        "allocation_id": allocation.pk,
        "job": {
            "id": job.pk,
            "image": job.image,
            "command": job.command,
            "gpu_count": allocation.gpu_count,
            "max_duration_s": job.max_duration_s,
            "isolation": job.isolation,
            # The agent checks its own country before it starts; it knows countries only.
            "allowed_countries": jurisdictions.countries_of(job.jurisdictions),
            "network_egress": job.network_egress,
            "sandboxed": job.sandboxed,
        },
        "gpus": gpus,
        "price_per_gpu_hour_micros": allocation.price_per_gpu_hour_micros,
    }


class NextAssignmentView(AgentView):
    POLL_INTERVAL_S = 0.25

    @extend_schema(
        parameters=[OpenApiParameter("wait", int, description="Seconds to wait for work (long poll).")],
        responses={200: s.AssignmentSerializer, 204: OpenApiResponse(description="No work now.")},
    )
    def get(self, request):
        try:
            wait = min(max(int(request.query_params.get("wait", 0)), 0), settings.ASSIGNMENT_LONG_POLL_MAX_S)
        except ValueError:
            wait = 0
        deadline = time.monotonic() + wait
        while True:
            allocation = market.allocation_pull(unit=self.unit)
            if allocation is not None:
                return Response(s.AssignmentSerializer(assignment_body(allocation)).data)
            if time.monotonic() >= deadline:
                return Response(status=status.HTTP_204_NO_CONTENT)
            time.sleep(self.POLL_INTERVAL_S)


class AllocationStartView(AgentView):
    @extend_schema(
        request=None,
        responses={
            200: s.JobStateSerializer,
            409: OpenApiResponse(description="problem+json: the job is past starting (cancelled, ended)"),
        },
    )
    def post(self, request, allocation_id):
        job = market.allocation_start(allocation=self.own_allocation(allocation_id))
        return Response({"state": job.state})


class AllocationUsageView(AgentView):
    @extend_schema(request=s.UsageSerializer, responses={200: s.UsageResultSerializer})
    def post(self, request, allocation_id):
        allocation = self.own_allocation(allocation_id)
        samples = [SampleReport(**sample) for sample in self.valid(s.UsageSerializer)["samples"]]
        accepted, duplicates = usage_record(allocation=allocation, samples=samples)
        return Response({"accepted": accepted, "duplicates": duplicates})


class AllocationLogsView(AgentView):
    @extend_schema(request=s.LogChunkSerializer, responses={200: s.LogChunkResultSerializer})
    def post(self, request, allocation_id):
        allocation = self.own_allocation(allocation_id)
        accepted, truncated = market.log_chunk_record(allocation=allocation, **self.valid(s.LogChunkSerializer))
        return Response({"accepted": accepted, "truncated": truncated})


class AllocationFinishView(AgentView):
    @extend_schema(request=s.FinishSerializer, responses={200: s.JobStateSerializer})
    def post(self, request, allocation_id):
        allocation = self.own_allocation(allocation_id)
        finish = self.valid(s.FinishSerializer)
        job = market.allocation_finish(allocation=allocation, exit_code=finish["exit_code"], reason=finish["reason"])
        return Response({"state": job.state})
