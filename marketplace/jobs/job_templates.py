"""Renters' job templates: a saved submit spec, by name, that a submit starts from.

A template holds the submit fields the renter gave (any of them: an image and a command, or only
requirements and secrets' names), checked as a submit checks them, field by field; a submit
naming it takes the template's fields and then its own, each of its own replacing the
template's whole (``env`` too), and the result is checked as any submit is.
"""

import re

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.jobs.models import JobTemplate
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import DomainError

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
NAME_RULE = "1–64 characters: lowercase letters, digits, '_', '.' and '-', starting with a letter or digit"


class TemplateLimitReached(DomainError):
    status = 409
    code = "template-limit"
    title = "Too many templates"


class TemplateUnknown(DomainError):
    code = "template-unknown"
    title = "Unknown template"


@transaction.atomic
def template_save(*, owner, name: str, spec: dict) -> tuple[JobTemplate, bool]:
    """Store the owner's template ``name``, replacing its spec if it exists. Returns (template,
    created)."""
    now = timezone.now()
    if JobTemplate.objects.filter(owner=owner, name=name).update(spec=spec, updated_at=now):
        return JobTemplate.objects.get(owner=owner, name=name), False
    if JobTemplate.objects.filter(owner=owner).count() >= settings.JOB_TEMPLATES_PER_USER:
        raise TemplateLimitReached(
            f"An account holds at most {settings.JOB_TEMPLATES_PER_USER} templates; delete one first."
        )
    try:
        with transaction.atomic():
            template = JobTemplate.objects.create(owner=owner, name=name, spec=spec, created_at=now, updated_at=now)
    except IntegrityError:  # saved at the same moment by another call: this spec wins
        JobTemplate.objects.filter(owner=owner, name=name).update(spec=spec, updated_at=now)
        return JobTemplate.objects.get(owner=owner, name=name), False
    audit_record("template.created", owner.public_id, actor=f"user:{owner.pk}", name=name)
    return template, True


def template_apply(*, owner, name: str, fields: dict) -> dict:
    """The submit the template ``name`` and ``fields`` make together (``fields`` win)."""
    template = JobTemplate.objects.filter(owner=owner, name=name).first() if isinstance(name, str) else None
    if template is None:
        detail = f"You have no template named {str(name)[:70]!r}: save it first (shedshare template save)."
        raise TemplateUnknown(detail)
    return {**template.spec, **fields}
