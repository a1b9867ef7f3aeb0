from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from marketplace.accounts.models import ApiKey
from marketplace.accounts.services import API_KEY_KIND, api_key_authenticate
from marketplace.kernel.api.auth import bearer_token
from marketplace.kernel.api.throttling import SharedRateThrottle
from marketplace.kernel.logcontext import log_bind


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
        log_bind(renter=key.user_id)  # for the rest of the request (ObservedRequestMiddleware undoes it)
        return key.user, key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


def scopes_needed(request, view) -> tuple[str, ...]:
    """Reads need ``read``; writes need the view's ``write_scopes``. A view that names none is
    closed to keys for writes, so a new endpoint is never writable by a narrowed key by accident."""
    if request.method in permissions.SAFE_METHODS:
        return ("read",)
    return tuple(getattr(view, "write_scopes", ())) or ApiKey.SCOPES


class ApiKeyScopePermission(permissions.BasePermission):
    """Requests made with an API key need the key's scopes; session logins have them all."""

    def has_permission(self, request, view) -> bool:
        key = request.auth
        if not isinstance(key, ApiKey):
            return True
        for scope in scopes_needed(request, view):
            if scope not in key.scopes:
                raise exceptions.PermissionDenied(f"This API key lacks the '{scope}' scope.", code="scope_missing")
        return True


class ApiKeyRateThrottle(SharedRateThrottle):
    """Counts each renter's requests, whichever of their keys (or their session login) made them:
    minting more keys does not multiply the limit. Other callers, such as node agents, are
    counted by their own throttles."""

    scope = "api"
    setting = "API_RATE_LIMIT"

    def counts(self, request, view) -> bool:
        return True

    def ident(self, request, view) -> str | None:
        if not self.counts(request, view):
            return None
        if isinstance(request.auth, ApiKey) or (request.auth is None and request.user.is_authenticated):
            return f"user:{request.user.pk}"
        return None


class ApiKeySubmitThrottle(ApiKeyRateThrottle):
    """A tighter limit on writes that need the ``submit`` scope: submitting and cancelling jobs."""

    scope = "submit"
    setting = "API_SUBMIT_RATE_LIMIT"

    def counts(self, request, view) -> bool:
        return request.method not in permissions.SAFE_METHODS and "submit" in scopes_needed(request, view)


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "marketplace.accounts.api.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A renter API key, shs_live_..."}
