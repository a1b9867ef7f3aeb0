from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from marketplace import services
from marketplace.api.renderers import CsvRenderer
from marketplace.api.serializers import JobSerializer, JobSubmitSerializer, PlacementRecordSerializer
from marketplace.selectors import job_placement_records, jobs_for


class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """A renter's jobs. Every lookup goes through ``jobs_for``, so another renter's job is a 404."""

    serializer_class = JobSerializer
    lookup_value_regex = "[0-9a-f-]{36}"

    def get_queryset(self):
        return jobs_for(self.request.user)

    @extend_schema(request=JobSubmitSerializer, responses={201: JobSerializer})
    def create(self, request):
        submitted = JobSubmitSerializer(data=request.data)
        submitted.is_valid(raise_exception=True)
        job = services.job_submit(renter=request.user, spec=submitted.to_spec())
        job = self.get_queryset().get(pk=job.pk)
        return Response(JobSerializer(job).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: JobSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = services.job_cancel(job=self.get_object(), actor=f"user:{request.user.pk}")
        return Response(JobSerializer(self.get_queryset().get(pk=job.pk)).data)

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
