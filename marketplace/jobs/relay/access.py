"""Who may reach which job's port, and where its agent's stream is held: the relay's database
work (synchronous, run in the connection server's threads), and its traffic counts."""

import uuid
from dataclasses import dataclass
from datetime import date

from django.db import transaction
from django.db.models import F

from marketplace.accounts.services import API_KEY_KIND, api_key_authenticate
from marketplace.jobs import jurisdictions
from marketplace.jobs.models import Allocation, Job, ServiceTraffic
from marketplace.jobs.relay.channels import Unavailable
from marketplace.jobs.relay.tokens import endpoint_token_job

NOT_FOUND = "No such job or port of yours."


@dataclass(frozen=True)
class Target:
    job_id: str
    allocation_id: str
    unit_id: str
    port: int
    holder: str  # the id of the connection server holding the unit's stream ("" if none)
    holder_address: str  # where that server takes relay peers
    holder_location: str = ""  # where that server runs
    jurisdictions: tuple[str, ...] = ()  # where the job may be served from, if relay_in_jurisdiction


def target(token: str, job_id: str, port: int, *, protocol: str | None, scope: str = "read") -> Target:
    """The running job ``job_id`` of the renter whose API key ``token`` is (or, for HTTP, whose
    endpoint token it is), and its ``port`` (of ``protocol``, if given). A key needs ``scope``:
    "read" to read from a service (GET, HEAD, OPTIONS), "submit" for anything else and for a
    tunnel. Raises Unavailable: 401 without a valid key or token, 403 for a key without the
    scope, 404 for a job or port that
    is not the caller's (another renter's job is not said to exist), 503 for a job not running
    yet, 410 for one that ended."""
    key = api_key_authenticate(plaintext=token) if token.startswith(f"{API_KEY_KIND}_") else None
    if key is not None and scope not in key.scopes:
        raise Unavailable(403, f"This API key lacks the '{scope}' scope.")
    opens = endpoint_token_job(token) if key is None and protocol == "http" else None
    if key is None and opens is None:
        raise Unavailable(401, "The renter's API key, or an endpoint token of the job, is needed.")
    try:
        mine = Job.objects.filter(renter=key.user) if key is not None else Job.objects.filter(pk=opens)
        job = mine.get(pk=uuid.UUID(job_id))
    except (ValueError, Job.DoesNotExist):
        raise Unavailable(404, NOT_FOUND) from None
    declared = {entry.get("port"): entry.get("protocol", "http") for entry in job.ports or []}
    if port not in declared or (protocol is not None and declared[port] != protocol):
        raise Unavailable(404, NOT_FOUND)
    if job.state in Job.FINAL_STATES:
        raise Unavailable(410, f"The job has ended ({job.state}).")
    allocation = (
        Allocation.objects.filter(job=job, released_at__isnull=True).select_related("unit__stream_server").first()
    )
    if job.state != Job.State.RUNNING or allocation is None:
        raise Unavailable(503, f"The job is not running yet ({job.state}).", 5.0)
    unit = allocation.unit
    server = unit.stream_server
    return Target(
        job_id=str(job.pk),
        allocation_id=str(allocation.pk),
        unit_id=str(unit.pk),
        port=port,
        holder=server.pk if server else "",
        holder_address=server.relay_address if server else "",
        holder_location=server.location if server else "",
        jurisdictions=tuple(job.jurisdictions) if job.relay_in_jurisdiction else (),
    )


def relay_refusal(target: Target, *, here: str, through_holder: bool) -> str | None:
    """Why this server may not serve the target (its job asks to be served within its
    jurisdictions, and this server, or the one holding its stream, is not), or None."""
    if not target.jurisdictions:
        return None
    servers = [("this server", here)]
    if through_holder:
        servers.append(("the server holding the shed's connection", target.holder_location))
    for who, location in servers:
        if not _within(target.jurisdictions, location):
            where = location or "an unstated place"
            return f"The job is served only from {', '.join(target.jurisdictions)}; {who} runs in {where}."
    return None


def _within(codes: tuple[str, ...], location: str) -> bool:
    if not location:
        return False
    subdivision = location if "-" in location else ""
    return jurisdictions.match(codes, location.split("-")[0], subdivision) is not None


def traffic_add(counts: dict[tuple[str, date, int, str], list[int]]) -> None:
    """Add (job id, day, port, relayed in) -> [requests, bytes in, bytes out] to the jobs' traffic."""
    for (job_id, day, port, relayed_in), (requests, bytes_in, bytes_out) in counts.items():
        with transaction.atomic():
            row, _ = ServiceTraffic.objects.select_for_update().get_or_create(
                job_id=job_id, day=day, port=port, relayed_in=relayed_in
            )
            ServiceTraffic.objects.filter(pk=row.pk).update(
                requests=F("requests") + requests,
                bytes_in=F("bytes_in") + bytes_in,
                bytes_out=F("bytes_out") + bytes_out,
            )
