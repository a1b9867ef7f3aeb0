"""What the node agent API does, one function per call (enrol, heartbeat, next assignment, and
start, secrets, staging, usage, logs and finish of an allocation). The views in ``agent_api/`` only parse the
request, call one of these and serialise the answer; each answer is a protocol shape
(``nodes/agent/protocol.py``)."""

from uuid import UUID

from django.conf import settings
from django.shortcuts import get_object_or_404
from django.utils import timezone

from marketplace.jobs import jurisdictions
from marketplace.jobs import services as market
from marketplace.jobs.models import Allocation
from marketplace.jobs.usage import SampleReport, UsageReport, usage_record, usage_record_many
from marketplace.kernel import metrics
from nodes import services
from nodes.agent import protocol
from nodes.models import Unit

POLL_INTERVAL_S = 0.25  # how often a long poll for work looks again


def agent_enrol(*, token: str, hostname: str, agent_version: str, address: str) -> dict:
    unit, credential = services.unit_enrol(token=token, hostname=hostname, agent_version=agent_version, address=address)
    return {"unit_id": unit.pk, "credential": credential, "heartbeat_interval_s": settings.HEARTBEAT_INTERVAL_S}


def agent_heartbeat(*, unit: Unit, beat: protocol.Heartbeat, address: str) -> protocol.HeartbeatReply:
    """Everything a heartbeat implies: store the unit's inventory and telemetry (and place queued
    jobs if its capacity grew), reconcile its allocations with what it says it runs, and answer
    with what the agent must do: cancel, preempt, and the owner's policy to apply locally."""
    gpus = [services.gpu_report(gpu) for gpu in beat["gpus"]]
    if services.unit_heartbeat(
        unit=unit,
        gpus=gpus,
        agent_version=beat["agent_version"],
        advertise=beat["advertise"],
        limits=beat["limits"],
        address=address,
        country=beat.get("country"),
    ):
        market.placement_request()
    running = beat["running"]
    market.allocations_reconcile(unit=unit, running_ids=running)
    return agent_state(unit=unit, running=running)


def agent_state(*, unit: Unit, running: list) -> protocol.HeartbeatReply:
    """What the agent must hear about the unit and the allocations it runs (a read only): what
    a heartbeat answers, and what a stream pushes when something changed."""
    return {
        "status": unit.status,
        "heartbeat_interval_s": settings.HEARTBEAT_INTERVAL_S,
        "cancel": market.allocations_to_cancel(unit=unit, running_ids=running),
        "preempt": market.allocations_to_preempt(unit=unit, running_ids=running),
        "policy": services.unit_policy(unit),
    }


def agent_unconfirmed(*, unit: Unit) -> dict[str, float]:
    """The allocations the unit's agent has picked up and not finished: id -> when picked up
    (a POSIX time). A stream holds its heartbeats to full ones while one of them is missing
    from what the agent reports, until the server has given it up."""
    rows = market.allocations_picked_up(unit=unit)
    return {str(pk): at.timestamp() for pk, at in rows}


def agent_assignment_next(*, unit: Unit) -> dict | None:
    """The unit's next assignment, marking it acknowledged; None if there is none now."""
    allocation = market.allocation_pull(unit=unit)
    if allocation is None:
        return None
    metrics.ASSIGNMENT_PUSH.observe(max((timezone.now() - allocation.created_at).total_seconds(), 0.0))
    return _assignment(allocation)


def agent_assignment_waiting(*, unit: Unit) -> bool:
    """Whether an assignment waits for the unit (a read only: the pull marks it)."""
    return market.allocation_waiting(unit=unit)


def agent_allocation(*, unit: Unit, allocation_id: UUID) -> Allocation:
    """The allocation a call is about, looked up before its body is read. Scoped to the caller's
    unit: another unit's allocation is indistinguishable from none (404)."""
    return get_object_or_404(Allocation.objects.select_related("job"), pk=allocation_id, unit=unit)


def agent_allocation_start(*, allocation: Allocation, image_digest: str = "", runs_in: str = "") -> dict:
    job = market.allocation_start(allocation=allocation, image_digest=image_digest, runs_in=runs_in)
    return {"state": job.state}


def agent_allocation_usage(*, allocation: Allocation, samples: list[dict]) -> dict:
    accepted, duplicates = usage_record(allocation=allocation, samples=[SampleReport(**sample) for sample in samples])
    return {"accepted": accepted, "duplicates": duplicates}


def agent_usage_many(calls: list[tuple[str, UUID, list[dict]]]) -> list[dict | None]:
    """Many agents' usage calls (node credential, allocation, valid samples), taken in one
    transaction (``usage_record_many``). Each gets the answer ``agent_allocation_usage`` would
    give, or None where it must be made on its own to get its answer: an unknown credential, an
    allocation not of its unit, a refused batch."""
    units = services.units_authenticate({credential for credential, _, _ in calls})
    reports = [
        # A credential that does not hold names no unit, and no allocation is of none.
        UsageReport(getattr(units.get(credential), "pk", None), allocation_id, [SampleReport(**s) for s in samples])
        for credential, allocation_id, samples in calls
    ]
    return [
        None if result is None else {"accepted": result[0], "duplicates": result[1]}
        for result in usage_record_many(reports)
    ]


def agent_allocation_logs(*, allocation: Allocation, offset: int, data: str) -> dict:
    accepted, truncated = market.log_chunk_record(allocation=allocation, offset=offset, data=data)
    return {"accepted": accepted, "truncated": truncated}


def agent_allocation_secrets(*, allocation: Allocation) -> dict:
    """The values of the job's secrets, by variable name, and its registry credential, for the
    agent about to start it (or, after a restart, running it: it masks them in the job's log)."""
    return market.allocation_secrets(allocation=allocation)


def agent_allocation_staging(*, allocation: Allocation, **report) -> dict:
    market.allocation_staged(allocation=allocation, **report)
    return {"recorded": True}


def agent_allocation_finish(*, allocation: Allocation, exit_code: int | None, reason: str) -> dict:
    job = market.allocation_finish(allocation=allocation, exit_code=exit_code, reason=reason)
    return {"state": job.state}


def _assignment(allocation: Allocation) -> dict:
    job = allocation.job
    gpus = [
        {
            "index": lease.slice.gpu.index,
            "uuid": lease.slice.device_uuid,
            "gpu_uuid": lease.slice.gpu.device_uuid,
            "kind": lease.slice.kind,
            "share": lease.slice.share_index,
        }
        for lease in allocation.leases.select_related("slice__gpu").order_by("slice__gpu__index", "slice__share_index")
    ]
    return {
        "allocation_id": allocation.pk,
        "job": {
            "id": job.pk,
            "image": job.image,
            "command": job.command,
            "gpu_count": allocation.gpu_count,
            "max_duration_s": job.max_duration_s,
            "isolation": job.isolation,
            # The agent checks its own country before it starts; it knows countries only.
            "allowed_countries": jurisdictions.countries_of(job.jurisdictions),
            "network_egress": job.network_egress,
            "sandboxed": job.sandboxed,
            "interruptible": allocation.interruptible,
            "env": job.env,
            # Names only: the agent asks for the values (agent_allocation_secrets) as it starts.
            "secrets": sorted(job.secrets),
            "ports": list(job.ports or []),
            "registry_auth": bool(job.registry_secret),
            "inputs": job.inputs,
            "outputs": job.outputs,
        },
        "gpus": gpus,
        "price_per_gpu_hour_micros": allocation.price_per_gpu_hour_micros,
    }
