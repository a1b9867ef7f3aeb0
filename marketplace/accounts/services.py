"""Writes to people's accounts: signing up, editing a profile, and renter API keys."""

from collections.abc import Sequence
from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.accounts.models import ApiKey, RenterProfile
from marketplace.accounts.selectors import active_api_keys, email_in_use
from marketplace.kernel import tokens
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import DomainError

EMAIL_TAKEN = "Another account already uses this email address."


def _email_free(email: str, *, user=None) -> None:
    # Password resets go to an address, so an address must lead to one account. The forms check
    # this first to show the error beside the field; this check is the one every write passes, and
    # the unique index on LOWER(email) (``User.Meta``) decides between two writes at once.
    if email_in_use(email, exclude=user):
        raise ValidationError({"email": EMAIL_TAKEN}, code="unique")


def user_sign_up(*, username: str, email: str, password: str):
    try:
        with transaction.atomic():
            _email_free(email)
            return get_user_model().objects.create_user(username=username, email=email, password=password)
    except IntegrityError:
        if email_in_use(email):
            raise ValidationError({"email": EMAIL_TAKEN}, code="unique") from None
        raise ValidationError({"username": "A user with that username already exists."}, code="unique") from None


def user_profile_update(*, user, first_name: str, last_name: str, email: str):
    try:
        with transaction.atomic():
            _email_free(email, user=user)
            user.first_name, user.last_name = first_name, last_name
            user.email = get_user_model().objects.normalize_email(email)
            user.save(update_fields=["first_name", "last_name", "email"])
            return user
    except IntegrityError:
        raise ValidationError({"email": EMAIL_TAKEN}, code="unique") from None


API_KEY_KIND = "shs_live"


class ApiKeyLimitReached(DomainError):
    status = 409
    code = "api-key-limit-reached"
    title = "Too many API keys"


@transaction.atomic
def api_key_create(
    *, user, name: str, expires_at: datetime | None = None, scopes: Sequence[str] | None = None
) -> tuple[ApiKey, str]:
    """Create an API key; the plaintext is returned once and never stored. No scopes means all.
    A renter holds at most API_KEYS_PER_USER keys that are neither revoked nor expired."""
    scopes = ApiKey.SCOPES if scopes is None else scopes
    unknown = set(scopes) - set(ApiKey.SCOPES)
    if unknown or not scopes:
        raise DomainError(f"Scopes must be a non-empty subset of {', '.join(ApiKey.SCOPES)}.")
    # The user's row is locked so that two creations at once cannot both see room for one more.
    get_user_model().objects.select_for_update().filter(pk=user.pk).first()
    if active_api_keys(user).count() >= settings.API_KEYS_PER_USER:
        raise ApiKeyLimitReached(
            f"You have {settings.API_KEYS_PER_USER} active API keys, the most one account may hold; "
            "revoke one you no longer use (DELETE /api/v1/api-keys/{id}) before creating another."
        )
    issued = tokens.token_issue(API_KEY_KIND)
    key = ApiKey.objects.create(
        user=user,
        name=name,
        lookup=issued.lookup,
        digest=issued.digest,
        expires_at=expires_at,
        scopes=[scope for scope in ApiKey.SCOPES if scope in scopes],
    )
    return key, issued.plaintext


def api_key_revoke(*, key: ApiKey) -> ApiKey:
    """Revoke a key; revoking it again changes nothing."""
    if ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now()):
        audit_record("api_key.revoked", key.pk, actor=f"user:{key.user_id}")
    key.refresh_from_db()
    return key


def api_key_authenticate(*, plaintext: str) -> ApiKey | None:
    lookup = tokens.token_lookup(plaintext, API_KEY_KIND)
    if lookup is None:
        return None
    key = ApiKey.objects.select_related("user").filter(lookup=lookup, revoked_at__isnull=True).first()
    if key is None or not tokens.token_matches(plaintext, key.digest):
        return None
    now = timezone.now()
    if key.expires_at is not None and key.expires_at <= now:
        return None
    if not key.user.is_active:
        return None
    return key


@transaction.atomic
def renters_verify(*, profiles, actor: str) -> int:
    """Mark renters verified (owners may accept verified renters only); a renter verified
    already keeps the first verification time. Returns how many were verified now."""
    now = timezone.now()
    pending = list(
        RenterProfile.objects.select_related("user").filter(pk__in=profiles.values("pk"), verified_at__isnull=True)
    )
    RenterProfile.objects.filter(pk__in=[p.pk for p in pending]).update(verified_at=now)
    for profile in pending:
        audit_record("renter.verified", profile.user.public_id, actor=actor)
    return len(pending)
