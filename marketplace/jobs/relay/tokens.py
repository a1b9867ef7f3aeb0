"""Endpoint tokens: what a renter hands their own users so that they may call one job's HTTP
ports through the relay, without the renter's API key; each revocable on its own."""

from django.db import transaction
from django.utils import timezone

from marketplace.jobs.models import EndpointToken, Job
from marketplace.kernel import tokens
from marketplace.kernel.audit import audit_record

ENDPOINT_TOKEN_KIND = "shs_ep"  # noqa: S105 - the prefix of the tokens, not one
TOKENS_PER_JOB = 100


class TooManyTokens(Exception):
    pass


@transaction.atomic
def endpoint_token_create(*, job: Job, name: str, actor: str) -> tuple[EndpointToken, str]:
    """A new token for the job's endpoints and its plaintext, which is not kept."""
    Job.objects.select_for_update().filter(pk=job.pk).first()  # one count at a time
    if job.endpoint_tokens.filter(revoked_at__isnull=True).count() >= TOKENS_PER_JOB:
        raise TooManyTokens(f"A job has at most {TOKENS_PER_JOB} endpoint tokens; revoke one first.")
    issued = tokens.token_issue(ENDPOINT_TOKEN_KIND)
    token = EndpointToken.objects.create(job=job, name=name, lookup=issued.lookup, digest=issued.digest)
    audit_record("job.endpoint_token_created", job.pk, actor=actor, token=str(token.pk), name=name)
    return token, issued.plaintext


def endpoint_token_revoke(*, token: EndpointToken, actor: str) -> EndpointToken:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record("job.endpoint_token_revoked", token.job_id, actor=actor, token=str(token.pk))
    return token


def endpoint_token_job(plaintext: str) -> str | None:
    """The id of the job a valid, unrevoked endpoint token opens, or None."""
    lookup = tokens.token_lookup(plaintext, ENDPOINT_TOKEN_KIND)
    if lookup is None:
        return None
    token = EndpointToken.objects.filter(lookup=lookup, revoked_at__isnull=True).first()
    if token is None or not tokens.token_matches(plaintext, token.digest):
        return None
    return str(token.job_id)
