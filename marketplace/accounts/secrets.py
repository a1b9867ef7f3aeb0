"""Renters' secrets: set, list, delete, and reveal to the one caller that may read them (the
agent of a running job that names them, through marketplace/jobs/agent_use_cases.py).

A value is sealed before it is stored and leaves the platform only through ``secrets_reveal``;
the audit trail records names, never values; errors name the secret, never its value.
"""

import re

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.accounts.models import Secret
from marketplace.kernel import sealing
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import DomainError

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
NAME_RULE = "1–64 characters: lowercase letters, digits, '_', '.' and '-', starting with a letter or digit"
VALUE_MAX_BYTES = 32 * 1024


class SecretsUnavailable(DomainError):
    status = 503
    code = "secrets-unavailable"
    title = "Secrets unavailable"


class SecretLimitReached(DomainError):
    status = 409
    code = "secret-limit"
    title = "Too many secrets"


class SecretMissing(DomainError):
    status = 404
    code = "secret-missing"
    title = "No such secret"


def _sealed(value: str) -> str:
    try:
        return sealing.seal(value)
    except sealing.SealingUnavailable:
        raise SecretsUnavailable("This marketplace has no key to seal secrets with (SECRETS_KEYS).") from None


@transaction.atomic
def secret_set(*, owner, name: str, value: str) -> tuple[Secret, bool]:
    """Store the owner's secret under ``name``, replacing its value if it exists. Returns
    (secret, created)."""
    sealed = _sealed(value)
    now = timezone.now()
    updated = Secret.objects.filter(owner=owner, name=name).update(sealed=sealed, updated_at=now)
    if updated:
        audit_record("secret.replaced", owner.public_id, actor=f"user:{owner.pk}", name=name)
        return Secret.objects.get(owner=owner, name=name), False
    if Secret.objects.filter(owner=owner).count() >= settings.SECRETS_PER_USER:
        raise SecretLimitReached(f"An account holds at most {settings.SECRETS_PER_USER} secrets; delete one first.")
    try:
        with transaction.atomic():
            secret = Secret.objects.create(owner=owner, name=name, sealed=sealed, created_at=now, updated_at=now)
    except IntegrityError:  # set at the same moment by another call: this value wins
        Secret.objects.filter(owner=owner, name=name).update(sealed=sealed, updated_at=now)
        return Secret.objects.get(owner=owner, name=name), False
    audit_record("secret.created", owner.public_id, actor=f"user:{owner.pk}", name=name)
    return secret, True


def secret_delete(*, secret: Secret) -> None:
    audit_record("secret.deleted", secret.owner.public_id, actor=f"user:{secret.owner_id}", name=secret.name)
    secret.delete()


def secrets_missing(*, owner, names) -> list[str]:
    """Which of ``names`` the owner has no secret under, sorted."""
    held = set(Secret.objects.filter(owner=owner, name__in=list(names)).values_list("name", flat=True))
    return sorted(set(names) - held)


def secrets_reveal(*, owner, names) -> dict[str, str]:
    """The plain values of the owner's secrets ``names`` (name -> value). Raises SecretMissing
    for one that no longer exists, SecretsUnavailable if no key opens one."""
    sealed = dict(Secret.objects.filter(owner=owner, name__in=list(names)).values_list("name", "sealed"))
    missing = sorted(set(names) - set(sealed))
    if missing:
        raise SecretMissing(f"The secret {missing[0]!r} no longer exists.")
    try:
        return {name: sealing.unseal(value) for name, value in sealed.items()}
    except sealing.SealingUnavailable:
        raise SecretsUnavailable("This marketplace has no key to open secrets with (SECRETS_KEYS).") from None
    except sealing.Unreadable:
        raise SecretsUnavailable("A secret was sealed with a key this marketplace no longer has.") from None


def secrets_rotate() -> tuple[int, int]:
    """Seal every secret again with the newest key. Returns (resealed, unreadable)."""
    resealed = unreadable = 0
    for pk in Secret.objects.values_list("pk", flat=True).iterator():
        with transaction.atomic():
            secret = Secret.objects.select_for_update().filter(pk=pk).first()
            if secret is None:
                continue
            try:
                secret.sealed = sealing.reseal(secret.sealed)
            except sealing.Unreadable:
                unreadable += 1
                continue
            secret.save(update_fields=["sealed"])
            resealed += 1
    return resealed, unreadable
