"""Renters' secrets at /api/v1/secrets: set (PUT /secrets/NAME), list, delete. A value goes in
and never comes out: every answer carries names and dates only."""

from django.utils.cache import add_never_cache_headers
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from marketplace.accounts import secrets
from marketplace.accounts.models import Secret
from marketplace.kernel.api.serializers import StrictSerializer


class SecretSerializer(serializers.ModelSerializer):
    class Meta:
        model = Secret
        fields = ["name", "created_at", "updated_at"]
        read_only_fields = fields


class SecretValueSerializer(StrictSerializer):
    # Never echoed back, in an answer or an error: DRF's messages for these rules name none of it.
    value = serializers.CharField(trim_whitespace=False, write_only=True)

    def validate_value(self, value: str) -> str:
        if not value:
            raise serializers.ValidationError("A secret cannot be empty.")
        if len(value.encode()) > secrets.VALUE_MAX_BYTES:
            raise serializers.ValidationError(f"A secret holds at most {secrets.VALUE_MAX_BYTES} bytes.")
        return value


@extend_schema_view(
    list=extend_schema(summary="Your secrets", description="Names and dates: a value is never shown again."),
    destroy=extend_schema(
        summary="Delete a secret",
        description="A job that names it and has not started yet fails when its unit asks for it.",
        responses={204: None, 404: OpenApiResponse(description="problem+json")},
    ),
)
class SecretViewSet(mixins.ListModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = SecretSerializer
    lookup_field = "name"
    lookup_value_regex = "[^/]+"  # any name reaches the view, which says what a valid one is
    pagination_class = None
    write_scopes = ("submit",)

    def get_queryset(self):
        return Secret.objects.filter(owner=self.request.user).order_by("name")

    @extend_schema(
        summary="Set a secret",
        description=f"Create or replace the secret NAME ({secrets.NAME_RULE}); its value is sealed at rest and "
        "handed only to the agent running a job of yours that names it. 201 when created, 200 when replaced.",
        request=SecretValueSerializer,
        responses={
            200: SecretSerializer,
            201: SecretSerializer,
            409: OpenApiResponse(description="problem+json: the account holds the most secrets it may"),
        },
    )
    def update(self, request, name=None):
        if not secrets.NAME.fullmatch(name):
            raise serializers.ValidationError({"name": [f"A secret's name is {secrets.NAME_RULE}."]})
        submitted = SecretValueSerializer(data=request.data)
        submitted.is_valid(raise_exception=True)
        secret, created = secrets.secret_set(owner=request.user, name=name, value=submitted.validated_data["value"])
        answer = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        response = Response(SecretSerializer(secret).data, status=answer)
        add_never_cache_headers(response)
        return response

    def destroy(self, request, name=None):
        secrets.secret_delete(secret=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)
