"""Reads about people's accounts."""

from django.contrib.auth import get_user_model
from django.db.models import Q
from django.utils import timezone

from marketplace.accounts.models import ApiKey, RenterProfile


def email_in_use(email: str, *, exclude=None) -> bool:
    """Whether an account other than ``exclude`` has this address; case does not make two addresses different."""
    users = get_user_model().objects.filter(email__iexact=email)
    if exclude is not None:
        users = users.exclude(pk=exclude.pk)
    return users.exists()


def renter_verified(user_id) -> bool:
    """Whether the platform has verified this renter, as owners accepting verified renters only require."""
    return RenterProfile.objects.filter(user_id=user_id, verified_at__isnull=False).exists()


def active_api_keys(user):
    """The user's API keys that still authenticate: neither revoked nor expired."""
    unexpired = Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now())
    return ApiKey.objects.filter(unexpired, user=user, revoked_at__isnull=True)
