"""Where a request came from, as far as the deployment's proxies let us know."""

from django.conf import settings


def client_address(request) -> str:
    """The address the caller connected from. Behind TRUSTED_PROXY_COUNT proxies it is the
    entry that many hops from the right of X-Forwarded-For: the hops left of it were written by
    the caller and prove nothing."""
    hops = settings.TRUSTED_PROXY_COUNT
    if hops > 0:
        forwarded = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
        return forwarded[-hops] if len(forwarded) >= hops else ""
    return request.META.get("REMOTE_ADDR", "")
