from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from marketplace.models import ApiKey
from marketplace.services import API_KEY_KIND, api_key_authenticate


def bearer_token(request) -> str | None:
    header = authentication.get_authorization_header(request).decode("latin-1")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """Renter API keys: ``Authorization: Bearer shs_live_...``."""

    def authenticate(self, request):
        token = bearer_token(request)
        if token is None or not token.startswith(f"{API_KEY_KIND}_"):
            return None
        key = api_key_authenticate(plaintext=token)
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked API key.")
        # Touch last use at most once a minute to keep reads cheap.
        now = timezone.now()
        if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return key.user, key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "marketplace.api.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A renter API key, shs_live_..."}
