"""Job templates at /api/v1/templates: save (PUT /templates/NAME with submit fields), list,
read, delete. A submit names one with ``"template": NAME``."""

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from marketplace.jobs import job_templates
from marketplace.jobs.api.serializers import JobSubmitSerializer
from marketplace.jobs.models import JobTemplate


class JobTemplateSerializer(serializers.ModelSerializer):
    spec = serializers.JSONField(help_text="The submit fields it holds, as they were given.")

    class Meta:
        model = JobTemplate
        fields = ["name", "spec", "created_at", "updated_at"]
        read_only_fields = fields


@extend_schema_view(
    list=extend_schema(summary="Your job templates"),
    retrieve=extend_schema(summary="One of your job templates"),
    destroy=extend_schema(
        summary="Delete a job template",
        description="Jobs submitted from it are not changed.",
        responses={204: None, 404: OpenApiResponse(description="problem+json")},
    ),
)
class JobTemplateViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    serializer_class = JobTemplateSerializer
    lookup_field = "name"
    lookup_value_regex = "[^/]+"  # any name reaches the view, which says what a valid one is
    pagination_class = None
    write_scopes = ("submit",)

    def get_queryset(self):
        return JobTemplate.objects.filter(owner=self.request.user).order_by("name")

    @extend_schema(
        summary="Save a job template",
        description=f"Create or replace the template NAME ({job_templates.NAME_RULE}) with any fields of a submit, "
        "each checked as a submit checks it; a submit with `template: NAME` starts from them and overrides them "
        "field by field. 201 when created, 200 when replaced.",
        request=JobSubmitSerializer,
        responses={200: JobTemplateSerializer, 201: JobTemplateSerializer},
    )
    def update(self, request, name=None):
        if not job_templates.NAME.fullmatch(name):
            raise serializers.ValidationError({"name": [f"A template's name is {job_templates.NAME_RULE}."]})
        if not isinstance(request.data, dict):
            raise serializers.ValidationError({"spec": ["A template is a JSON object of submit fields."]})
        if "template" in request.data:
            raise serializers.ValidationError({"template": ["A template cannot name another template."]})
        JobSubmitSerializer(data=request.data, partial=True).is_valid(raise_exception=True)
        template, created = job_templates.template_save(owner=request.user, name=name, spec=dict(request.data))
        answer = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(JobTemplateSerializer(template).data, status=answer)
