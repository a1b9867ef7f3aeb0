import uuid

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models import Q
from django.db.models.functions import Lower
from django.utils import timezone


class User(AbstractUser):
    """A person with a login: an owner, a renter, or both, and staff."""

    # What the audit trail and other apps name a person by (primary keys stay internal).
    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"
        constraints = [
            # One account per email address, whatever its case: sign-up and the profile check it
            # first, and this makes two sign-ups at the same moment unable to both succeed.
            # Blank emails (accounts made by operators or tests) are not constrained.
            models.UniqueConstraint(Lower("email"), condition=~Q(email=""), name="user_email_unique_ci"),
        ]


def api_key_scopes_default() -> list[str]:
    return list(ApiKey.SCOPES)


class ApiKey(models.Model):
    """A renter's API key: shown once, stored as a lookup part and an HMAC digest."""

    # read: safe methods; submit: submit and cancel jobs; billing: top-ups.
    SCOPES = ("read", "submit", "billing")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=80)
    lookup = models.CharField(max_length=12, unique=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    scopes = models.JSONField(default=api_key_scopes_default)

    def __str__(self) -> str:
        return f"{self.name} ({self.lookup})"


class RenterProfile(models.Model):
    """What the platform knows about a renter beyond the login; owners may accept verified renters only."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="renter_profile")
    verified_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"renter {self.user}"


class Secret(models.Model):
    """A renter's named secret (an API token, a registry password): sealed at rest
    (marketplace/kernel/sealing.py), shown to no one once stored, and handed only to the agent
    running a job of its owner's that names it."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="secrets")
    name = models.CharField(max_length=64)
    sealed = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="secret_name_unique_per_owner")]

    def __str__(self) -> str:
        return self.name
