"""Self-service API keys at /api/v1/api-keys: create (the key is shown once), list, revoke."""

from datetime import timedelta

from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from marketplace.accounts import services
from marketplace.accounts.models import ApiKey


class ApiKeySerializer(serializers.ModelSerializer):
    prefix = serializers.SerializerMethodField()
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=ApiKey.SCOPES))

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "lookup", "scopes", "created_at", "expires_at", "last_used_at", "revoked_at"]
        read_only_fields = fields

    def get_prefix(self, key: ApiKey) -> str:
        return f"{services.API_KEY_KIND}_{key.lookup}"


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(help_text="The key itself, shown this once; only a digest is stored.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=80)
    scopes = serializers.MultipleChoiceField(choices=ApiKey.SCOPES, required=False, allow_empty=False)
    expires_in_days = serializers.IntegerField(min_value=1, max_value=3650, required=False)


@extend_schema_view(
    list=extend_schema(summary="Your API keys", description="Never the keys themselves: only their prefixes."),
    destroy=extend_schema(
        summary="Revoke an API key",
        description="Revoking a revoked key is a 204 again. A key that is not yours is a 404.",
        responses={204: None, 404: OpenApiResponse(description="problem+json")},
    ),
)
class ApiKeyViewSet(mixins.ListModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = ApiKeySerializer
    lookup_value_regex = "[0-9a-f-]{36}"
    # Managing keys with a key needs every scope, so a narrowed key cannot mint a wider one.
    write_scopes = ApiKey.SCOPES

    def get_queryset(self):
        # Your own keys only, staff included.
        return ApiKey.objects.filter(user=self.request.user).order_by("-created_at", "id")

    @extend_schema(
        summary="Create an API key",
        description="The response carries the key once; store it. Scopes default to all of read, submit, billing. "
        "An account holds at most API_KEYS_PER_USER active keys (20 by default); one more is a 409.",
        request=ApiKeyCreateSerializer,
        responses={
            201: ApiKeyCreatedSerializer,
            409: OpenApiResponse(description="problem+json: the account holds the most active keys it may"),
        },
    )
    def create(self, request):
        submitted = ApiKeyCreateSerializer(data=request.data)
        submitted.is_valid(raise_exception=True)
        data = submitted.validated_data
        days = data.get("expires_in_days")
        key, plaintext = services.api_key_create(
            user=request.user,
            name=data["name"],
            scopes=data.get("scopes"),
            expires_at=timezone.now() + timedelta(days=days) if days else None,
        )
        response = Response({**ApiKeySerializer(key).data, "key": plaintext}, status=status.HTTP_201_CREATED)
        add_never_cache_headers(response)  # the key itself: no cache, proxy or history may keep it
        return response

    def destroy(self, request, pk=None):
        services.api_key_revoke(key=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)
