"""The residency record of a job: where it ran and under which guarantees, line by line with the
audit events behind each, as a data-protection officer files it (``GET /api/v1/jobs/{id}/residency``
and the printable page ``/portal/jobs/<id>/residency/``)."""

from django.utils import timezone

from marketplace.jobs import data, job_reads
from marketplace.jobs.models import Allocation, Job
from marketplace.kernel.models import AuditEvent
from nodes.agent.protocol import RunsIn

# What the unit's agent said it started the job in, in words: the record states what ran, not
# what the job asked for.
RUNS_IN = {
    RunsIn.CONTAINER: "a container of the unit's engine (runc)",
    RunsIn.SANDBOX: "a gVisor sandbox (runsc) on the unit's engine",
    RunsIn.PROCESS: "a plain process on the unit's host (the development runtime): not isolated",
}


def _isolation(job: Job, started: list[Allocation]) -> dict:
    """The isolation the job ran under, as the agent of its last started placement reported it."""
    runs_in = started[-1].runs_in if started else None
    if runs_in is None:
        runtime, network = "never started", "never started"
    elif runs_in == RunsIn.PROCESS:
        runtime, network = RUNS_IN[runs_in], "not cut: a process on the host reaches what the host reaches"
    else:
        runtime = RUNS_IN.get(runs_in, "not reported by the unit's agent")
        if job.network_egress:
            network = "allowed out (network_egress)"
        elif job.ports:
            network = "its own, reached by the shed's agent only (for its ports): nothing out, not the host"
        else:
            network = "none: the container had no network"
    # The unit's agent says what it ran the job in; the server cannot look inside the shed. Where
    # that is less than the job asked for, the record says so rather than repeat the request.
    asked = job.sandboxed and runs_in not in (None, "", RunsIn.SANDBOX)
    return {
        "level": job.isolation,
        "runs_in": runs_in or "",
        "runtime": runtime,
        "network": network,
        "reported_by": "the unit's agent, as it confirmed the start",
        "short_of_request": "the job asked for a gVisor sandbox; its unit's agent reported none" if asked else "",
    }


def _location(policy: dict) -> dict:
    """How the unit's location stood when it was chosen, from its placement record."""
    evidence = policy.get("verified_location") or {}
    ways = []
    if evidence.get("observed_country"):
        ways.append(f"its agent's public address was in {evidence['observed_country']}")
    if evidence.get("attested"):
        ways.append("an operator attested it")
    return {
        "verified": bool(evidence.get("verified")),
        "how": "; ".join(ways) or "declared by its owner, not verified",
        "required_verified": bool(evidence.get("required")),
        "jurisdiction_matched": (policy.get("jurisdiction") or {}).get("matched", ""),
    }


def _event(event: AuditEvent, job: Job) -> dict:
    return {
        "id": event.pk,
        "at": event.created_at.isoformat(),
        "action": event.action,
        "actor": job_reads.event_actor(event, job),
        "detail": job_reads.event_detail(event),
    }


STAGINGS = {"inputs": ("job.staged_in", "job.stage_in_failed"), "outputs": ("job.staged_out", "job.stage_out_failed")}


def _data(job: Job, events: list[AuditEvent]) -> dict:
    """Each input's origin and output's destination as declared (without the URLs' signatures),
    and every staging the agents reported: what moved, its size and SHA-256, when, and whether it
    all moved."""
    record = {}
    for name, declared in (("inputs", job.inputs), ("outputs", job.outputs)):
        stagings = [
            {"event": event.pk, "at": event.created_at.isoformat(), "ok": event.action == STAGINGS[name][0],
             "allocation": event.data.get("allocation"), "seconds": event.data.get("seconds"),
             "reason": event.data.get("reason", ""), "detail": event.data.get("detail", ""),
             "files": event.data.get("files", [])}
            for event in events if event.action in STAGINGS[name]
        ]  # fmt: skip
        record[name] = {
            "declared": [
                {"path": item["path"], "endpoint": data.endpoint(item["url"]), "jurisdiction": item["jurisdiction"]}
                for item in declared
            ],
            "staged": stagings,
        }
    record["moved_by"] = "the shed's agent, before the start and after the exit, not the job (see isolation.network)"
    return record


def _services(job: Job) -> dict:
    """What the job served through the relay: its ports, and per day, port and place of the
    connection server the requests and bytes (the relay keeps no payload)."""
    rows = job.traffic.order_by("day", "port", "relayed_in")
    return {
        "ports": list(job.ports or []),
        "relay_in_jurisdiction": job.relay_in_jurisdiction,
        "traffic": [
            {
                "day": row.day.isoformat(),
                "port": row.port,
                "relayed_in": row.relayed_in or "not stated",
                "requests": row.requests,
                "bytes_in": row.bytes_in,
                "bytes_out": row.bytes_out,
            }
            for row in rows
        ],
    }


def job_residency_record(job: Job) -> dict:
    events = list(job_reads.job_events(job))
    allocations = list(job.allocations.select_related("unit").order_by("created_at", "id"))
    placements = []
    for allocation in allocations:
        record = allocation.placement_record or {}
        mine = [event for event in events if (event.data or {}).get("allocation") == str(allocation.pk)]
        started = next((event for event in events if event.action == "job.started"
                        and event.created_at >= allocation.created_at
                        and event.actor == f"unit:{allocation.unit_id}"), None)  # fmt: skip
        placements.append({
            "allocation": str(allocation.pk),
            "unit": str(allocation.unit_id),
            "country": record.get("country") or allocation.unit.country.code,
            "subdivision": record.get("subdivision", allocation.unit.subdivision),
            "location": {**_location(record.get("policy") or {}), "as_of": allocation.created_at.isoformat()},
            "placed_at": allocation.created_at.isoformat(),
            "started_at": started.created_at.isoformat() if started else None,
            "released_at": allocation.released_at.isoformat() if allocation.released_at else None,
            "release_reason": allocation.release_reason,
            "image": job.image,
            "image_digest": allocation.image_digest,
            "runs_in": allocation.runs_in,
            "events": sorted({event.pk for event in [*mine, *([started] if started else [])]}),
        })  # fmt: skip
    return {
        "job": str(job.pk),
        "name": job.name,
        "state": job.state,
        "submitted_at": job.created_at.isoformat(),
        "generated_at": timezone.now().isoformat(),
        "rules": {
            "jurisdictions": list(job.jurisdictions) or "anywhere",
            "require_verified_location": job.require_verified_location,
        },
        "isolation": _isolation(job, [a for a, p in zip(allocations, placements, strict=True) if p["started_at"]]),
        "placements": placements,
        "data": _data(job, events),
        "services": _services(job),
        "secrets": {
            "variables": sorted(job.secrets),
            "registry_secret": job.registry_secret,
            "delivered_to": [
                {"at": event.created_at.isoformat(), "actor": event.actor, "event": event.pk}
                for event in events
                if event.action == "job.secrets_delivered"
            ],
        },
        "events": [_event(event, job) for event in events],
    }
