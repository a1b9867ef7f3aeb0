import uuid

from django.conf import settings
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from marketplace.jobs import job_reads, job_templates, services
from marketplace.jobs.api import serializers as s
from marketplace.jobs.api.filters import JOB_LIST_PARAMETERS, jobs_filter
from marketplace.jobs.api.serializers import JobSerializer, JobSubmitSerializer, PlacementRecordSerializer
from marketplace.jobs.relay.tokens import TooManyTokens, endpoint_token_create, endpoint_token_revoke
from marketplace.jobs.residency_record import job_residency_record
from marketplace.jobs.selectors import job_placement_records, jobs_for
from marketplace.kernel.api.idempotency import idempotent
from marketplace.kernel.api.longpoll import LongPollMixin, long_poll, wait_slots_take
from marketplace.kernel.api.renderers import CsvRenderer
from marketplace.kernel.api.text import PlainTextRenderer


def _log_page_response(request, page: job_reads.LogPage):
    if request.accepted_renderer.format != "txt":
        return Response(s.JobLogSerializer(page).data)
    # Not a DRF Response: that drops the Content-Type of an empty body (a page with no output yet).
    response = HttpResponse(page.data, content_type="text/plain; charset=utf-8")
    response["X-Log-Offset"], response["X-Log-Next-Offset"] = str(page.offset), str(page.next_offset)
    response["X-Log-Complete"] = "true" if page.complete else "false"
    return response


@extend_schema_view(list=extend_schema(parameters=JOB_LIST_PARAMETERS))
class JobViewSet(LongPollMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """A renter's jobs. Every lookup goes through ``jobs_for``, so another renter's job is a 404."""

    serializer_class = JobSerializer
    lookup_value_regex = "[0-9a-f-]{36}"
    write_scopes = ("submit",)

    def get_queryset(self):
        # The caller's own jobs, staff included (Job.objects.visible_to shows staff every job;
        # the admin is the staff tool), as the portal's job list does.
        return jobs_for(self.request.user).filter(renter=self.request.user)

    def filter_queryset(self, queryset):
        # Only the list filters: a detail lookup with ?state=… must still find the job.
        return jobs_filter(queryset, self.request.query_params) if self.action == "list" else queryset

    @extend_schema(request=JobSubmitSerializer, responses={201: JobSerializer})
    @idempotent
    def create(self, request):
        data = request.data
        if isinstance(data, dict) and "template" in data:
            fields = {field: value for field, value in data.items() if field != "template"}
            data = job_templates.template_apply(owner=request.user, name=data["template"], fields=fields)
        submitted = JobSubmitSerializer(data=data)
        submitted.is_valid(raise_exception=True)
        job = services.job_submit(renter=request.user, spec=submitted.to_spec())
        job = self.get_queryset().get(pk=job.pk)
        return Response(self.get_serializer(job).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=None,
        responses={200: JobSerializer, 409: OpenApiResponse(description="problem+json: the job has already ended")},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = services.job_cancel(job=self.get_object(), actor=f"user:{request.user.pk}")
        return Response(self.get_serializer(self.get_queryset().get(pk=job.pk)).data)

    @extend_schema(
        summary="The job's placement records",
        description="Every placement of the job, oldest first, with the rules that allowed it: the audit "
        "trail of its residency and policy decisions. JSON, or CSV with ?format=csv or Accept: text/csv.",
        parameters=[OpenApiParameter("format", str, enum=["json", "csv"], required=False)],
        responses={200: PlacementRecordSerializer(many=True)},
    )
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, CsvRenderer], pagination_class=None)
    def placements(self, request, pk=None):
        records = PlacementRecordSerializer(job_placement_records(self.get_object()), many=True).data
        response = Response(records)
        if request.accepted_renderer.format == "csv":
            response["Content-Disposition"] = f'attachment; filename="job-{pk}-placements.csv"'
        return response

    @extend_schema(
        summary="The job's timeline",
        description="What happened to the job, oldest first, from its audit trail; other people are not named.",
        responses={200: s.JobEventSerializer(many=True)},
    )
    @action(detail=True, methods=["get"])
    def events(self, request, pk=None):
        job = self.get_object()
        page = self.paginate_queryset(job_reads.job_events(job))
        return self.get_paginated_response(s.JobEventSerializer(page, many=True, context={"job": job}).data)

    @extend_schema(
        summary="The job's output",
        description="The stored output of the job's allocations in order, paged by UTF-8 byte offset. With wait, "
        "waits until there is output past offset or the job has ended (at most LONG_POLL_WAITS_PER_KEY waits at a "
        "time per API key; beyond that the page is answered at once). Raw text with ?format=txt or Accept: "
        "text/plain, with the page in the X-Log-Offset, X-Log-Next-Offset and X-Log-Complete headers.",
        parameters=[
            s.JobLogQuerySerializer,
            OpenApiParameter("format", str, enum=["json", "txt"], required=False),
        ],
        responses={
            (200, "application/json"): s.JobLogSerializer,
            (200, "text/plain"): OpenApiResponse(str, description="The page's text."),
        },
    )
    @long_poll
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, PlainTextRenderer], pagination_class=None)
    def logs(self, request, pk=None):
        job = self.get_object()
        query = s.JobLogQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        offset, limit, wait = (query.validated_data[k] for k in ("offset", "limit_bytes", "wait"))

        def answer():
            try:
                page = job_reads.job_log_read(job, offset=offset, limit=limit)
            except ValueError as error:
                raise ValidationError({"offset": [str(error)]}) from None
            return _log_page_response(request, page)

        def ready() -> bool:
            return job_reads.job_log_ready(job, offset=offset)

        if wait and not ready():
            caller = f"key:{request.auth.pk}" if getattr(request.auth, "pk", None) else f"user:{request.user.pk}"
            slots = wait_slots_take({caller: settings.LONG_POLL_WAITS_PER_KEY}, seconds=wait)
            if slots is not None:  # beyond the cap: answer at once
                return self.wait_for(seconds=wait, ready=ready, answer=answer, interval_s=job_reads.LOG_POLL_S,
                                     slots=slots)  # fmt: skip
        return answer()

    @extend_schema(
        summary="The job's residency record",
        description="Where the job ran (each placement's country and subdivision, how the location was verified and "
        "as of when), the rules it was placed under, its isolation level, runtime and network, the data it staged, "
        "who was handed its secrets (names only), and the audit events behind each line. A printable page of it is "
        "at /portal/jobs/<id>/residency/.",
        responses={200: OpenApiResponse(description="The record, as JSON")},
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def residency(self, request, pk=None):
        return Response(job_residency_record(self.get_object()))

    @extend_schema(
        methods=["GET"], summary="The job's endpoint tokens (never their values)",
        responses={200: s.EndpointTokenSerializer(many=True)},
    )  # fmt: skip
    @extend_schema(
        methods=["POST"],
        summary="A token for your own users to call the job's HTTP ports",
        description="The token is shown once, in this answer: they send it as Authorization: Bearer (or "
        "X-Shedshare-Key) to the job's service URL. It opens no other job, nor any API.",
        request=s.EndpointTokenCreateSerializer,
        responses={201: OpenApiResponse(description="The token's record and its value, `token`, shown once")},
    )
    @action(detail=True, methods=["get", "post"], url_path="endpoint-tokens", pagination_class=None)
    def endpoint_tokens(self, request, pk=None):
        job = self.get_object()
        if request.method == "GET":
            return Response(s.EndpointTokenSerializer(job.endpoint_tokens.order_by("created_at"), many=True).data)
        body = s.EndpointTokenCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            token, plaintext = endpoint_token_create(job=job, name=body.validated_data["name"],
                                                     actor=f"user:{request.user.pk}")  # fmt: skip
        except TooManyTokens as exc:
            raise ValidationError({"name": [str(exc)]}) from None
        return Response({**s.EndpointTokenSerializer(token).data, "token": plaintext}, status=status.HTTP_201_CREATED)

    @extend_schema(summary="Revoke an endpoint token", request=None, responses={204: None})
    @action(detail=True, methods=["delete"], url_path=r"endpoint-tokens/(?P<token_id>[0-9a-f-]{36})")
    def endpoint_token_revoke(self, request, pk=None, token_id=None):
        try:
            token_id = uuid.UUID(token_id)
        except ValueError:
            raise NotFound() from None
        token = get_object_or_404(self.get_object().endpoint_tokens, pk=token_id)
        endpoint_token_revoke(token=token, actor=f"user:{request.user.pk}")
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(summary="The job's usage and cost so far", responses={200: s.JobUsageSerializer})
    @action(detail=True, methods=["get"], pagination_class=None)
    def usage(self, request, pk=None):
        return Response(s.job_usage_data(job_reads.job_allocations_usage(self.get_object())))
