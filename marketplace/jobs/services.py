import contextlib
from datetime import datetime
from functools import partial

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.accounts.secrets import SecretMissing, SecretsUnavailable, secrets_missing, secrets_reveal
from marketplace.jobs import data, ports
from marketplace.jobs.models import Allocation, Job, LogChunk
from marketplace.jobs.selectors import allocation_log_size
from marketplace.jobs.units import unit_reliability_update
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import DomainError, StateConflict
from marketplace.kernel.models import AuditEvent
from marketplace.kernel.tasks import publish_on_commit
from marketplace.kernel.tracing import trace_enabled, trace_remember, trace_step
from nodes import streams
from nodes.agent import imageref, protocol
from nodes.models import Unit
from nodes.services import units_capacity_changed


class SecretUnknown(DomainError):
    code = "secret-unknown"
    title = "Unknown secret"


def placement_request(job_id=None) -> None:
    """Ask the placement workers to run once the current transaction commits: for one job, or
    a shallow pass over the oldest queued jobs when capacity may have freed."""
    from marketplace.jobs import tasks

    if job_id is None:
        publish_on_commit(tasks.placement_pass)
    else:
        publish_on_commit(tasks.job_place, str(job_id))


@transaction.atomic
def job_submit(*, renter, spec: dict) -> Job:
    named = [*(spec.get("secrets") or {}).values(), *([spec["registry_secret"]] if spec.get("registry_secret") else [])]
    missing = secrets_missing(owner=renter, names=named)
    if missing:
        raise SecretUnknown(
            f"You have no secret named {missing[0]!r}: set it first (shedshare secret set {missing[0]}, or PUT "
            f"/api/v1/secrets/{missing[0]})."
        )
    job = Job.objects.create(renter=renter, **spec)
    audit_record("job.submitted", job.id, actor=f"user:{renter.pk}")
    trace_remember(job.id)
    placement_request(job.id)
    return job


def _allocation_release(allocation: Allocation, *, reason: str, by_agent: bool = False) -> None:
    """Free the allocation's slices. ``by_agent``: its agent reported the end (a finish, a
    refusal), so its stream is not nudged to hear of it."""
    now = timezone.now()
    if Allocation.objects.filter(pk=allocation.pk, released_at__isnull=True).update(
        released_at=now, release_reason=reason
    ):
        allocation.leases.filter(released_at__isnull=True).update(released_at=now)
        units_capacity_changed([allocation.unit_id], agents_know=by_agent)
        unit_reliability_update(allocation.unit_id, now=now)
        audit_record("allocation.released", allocation.job_id, allocation=str(allocation.pk), reason=reason)
        placement_request()


def _active_allocation(job: Job) -> Allocation | None:
    return job.allocations.filter(released_at__isnull=True).first()


@transaction.atomic
def job_cancel(*, job: Job, actor: str) -> Job:
    """Cancel a job. A job the agent has not picked up is released at once; a running one keeps
    its lease until the agent confirms the process has stopped (the GPUs are busy until then)."""
    return _job_end(job, state=Job.State.CANCELLED, actor=actor, action="job.cancelled", release_as="cancelled")


@transaction.atomic
def job_stop(*, job: Job, actor: str, reason: str) -> Job:
    """End a job for the platform's reasons (its wallet ran dry): failed, with the reason, and
    stopped the way a cancel is."""
    return _job_end(job, state=Job.State.FAILED, actor=actor, action="job.stopped", release_as="stopped", why=reason)


def _job_end(job: Job, *, state: str, actor: str, action: str, release_as: str, why: str = "") -> Job:
    job = Job.objects.select_for_update().get(pk=job.pk)
    if job.is_final:
        raise StateConflict(f"The job has already ended ({job.state}).")
    previous = job.state
    job.state, job.finished_at, job.failure_reason = state, timezone.now(), why or job.failure_reason
    job.save(update_fields=["state", "finished_at", "failure_reason"])
    audit_record(action, job.id, actor=actor, previous=previous, **({"reason": why} if why else {}))
    allocation = _active_allocation(job)
    if allocation is not None and allocation.acknowledged_at is None:
        _allocation_release(allocation, reason=release_as)
    elif allocation is not None:
        streams.nudge([allocation.unit_id])  # the agent stops the job at once over its stream
    return job


def _allocations_unpulled(unit: Unit):
    return Allocation.objects.filter(unit=unit, acknowledged_at__isnull=True, released_at__isnull=True)


def allocation_waiting(*, unit: Unit) -> bool:
    """Whether an allocation waits for the unit's agent to pull it."""
    return _allocations_unpulled(unit).exists()


def allocation_pull(*, unit: Unit) -> Allocation | None:
    """Hand the agent its oldest placed allocation, marking the job as starting."""
    waiting = _allocations_unpulled(unit).select_related("job").order_by("created_at")
    for allocation in waiting:
        with transaction.atomic():
            now = timezone.now()
            # The conditional updates make a repeated or concurrent pull hand out an allocation once.
            if not Allocation.objects.filter(pk=allocation.pk, acknowledged_at__isnull=True).update(
                acknowledged_at=now
            ):
                continue
            Job.objects.filter(pk=allocation.job_id, state=Job.State.PLACED).update(state=Job.State.STARTING)
            audit_record("allocation.acknowledged", allocation.job_id, actor=f"unit:{unit.pk}")
        allocation.refresh_from_db()
        return allocation
    return None


@transaction.atomic
def allocation_start(*, allocation: Allocation, image_digest: str = "", runs_in: str = "") -> Job:
    """The agent starts the job, from the image with ``image_digest`` (empty: no registry image,
    as in the development runtime), in what ``runs_in`` says (``protocol.RunsIn``; empty: an
    agent that does not say). A job pinned by digest starts from that image or not at all."""
    job = Job.objects.select_for_update().get(pk=allocation.job_id)
    if allocation.released_at is not None or job.state not in (Job.State.STARTING, Job.State.PLACED):
        raise StateConflict(f"This allocation must not start: the job is {job.state}.")
    pinned = imageref.parse(job.image).digest
    if pinned and image_digest and image_digest != pinned:
        raise StateConflict(f"The job is pinned to {pinned}; this is {image_digest}.")
    job.state = Job.State.RUNNING
    job.started_at = timezone.now()
    job.save(update_fields=["state", "started_at"])
    Allocation.objects.filter(pk=allocation.pk).update(image_digest=image_digest, runs_in=runs_in)
    audit_record("job.started", job.id, actor=f"unit:{allocation.unit_id}", image_digest=image_digest, runs_in=runs_in)
    if trace_enabled():
        step = partial(trace_step, "job.started", job.id, unit=allocation.unit_id, allocation=allocation.pk)
        transaction.on_commit(step)
    return job


class RegistrySecretInvalid(DomainError):
    pass


def allocation_secrets(*, allocation: Allocation) -> dict:
    """What the job's agent needs of the renter's secrets while the allocation holds: the values of
    the job's secret variables (``env``) and, if it names one, the registry credential for its
    image (``registry``: username and password). A secret deleted since the submit, sealed with a
    key the marketplace no longer has, or a registry secret not USERNAME:PASSWORD fails the job (it
    could never start): StateConflict either way."""
    job = allocation.job
    if allocation.released_at is not None or job.state not in Job.ACTIVE_STATES:
        raise StateConflict(f"This allocation has ended: the job is {job.state}.")
    names = {*job.secrets.values(), *([job.registry_secret] if job.registry_secret else [])}
    try:
        values = secrets_reveal(owner=job.renter, names=names)
        registry = _registry_credential(job, values)
    except (SecretMissing, SecretsUnavailable, RegistrySecretInvalid) as error:
        with contextlib.suppress(StateConflict):  # ended meanwhile
            job_stop(job=job, actor="platform", reason=f"secrets: {error.detail}"[:255])
        raise StateConflict(f"The job cannot start: {error.detail}") from None
    audit_record(
        "job.secrets_delivered", job.id, actor=f"unit:{allocation.unit_id}", allocation=str(allocation.pk),
        variables=sorted(job.secrets), registry_secret=job.registry_secret,
    )  # fmt: skip
    answer = {"env": {variable: values[secret] for variable, secret in job.secrets.items()}}
    return {**answer, "registry": registry} if registry else answer


def _registry_credential(job: Job, values: dict[str, str]) -> dict | None:
    if not job.registry_secret:
        return None
    username, sep, password = values[job.registry_secret].partition(":")
    if not sep or not username or not password:
        raise RegistrySecretInvalid(f"The registry secret {job.registry_secret!r} is not USERNAME:PASSWORD.")
    return {"username": username, "password": password}


class StagedUndeclared(DomainError):
    status = 422
    code = "staging-undeclared"
    title = "Not the job's data"


STAGED = {("in", True): "job.staged_in", ("in", False): "job.stage_in_failed",
          ("out", True): "job.staged_out", ("out", False): "job.stage_out_failed"}  # fmt: skip


def allocation_staged(
    *, allocation: Allocation, phase: str, ok: bool, reason: str, detail: str, files: list[dict], seconds: float
) -> None:
    """Record what the allocation's agent staged of the job's data: each file's size and SHA-256
    as it measured them, with the endpoint and jurisdiction the job declared for its path (never
    the agent's word for where the data was, nor the URL's signature)."""
    if allocation.released_at is not None:
        raise StateConflict("This allocation has ended: its staging is over.")
    job = allocation.job
    declared = {item["path"]: item for item in (job.inputs if phase == "in" else job.outputs)}
    unknown = sorted({file["path"] for file in files} - set(declared))
    if unknown:
        raise StagedUndeclared(f"The job declares no {'input' if phase == 'in' else 'output'} at {unknown[0]!r}.")
    staged = [
        {**file, "endpoint": data.endpoint(declared[file["path"]]["url"]),
         "jurisdiction": declared[file["path"]]["jurisdiction"]}
        for file in files
    ]  # fmt: skip
    audit_record(
        STAGED[phase, ok], job.id, actor=f"unit:{allocation.unit_id}", allocation=str(allocation.pk),
        files=staged, seconds=round(seconds, 3), reason=reason, detail=detail,
    )  # fmt: skip


def _staging_failure(job: Job, reason: str) -> str:
    """The failure reason of a job whose data could not be staged: the agent's report's detail."""
    action = "job.stage_in_failed" if reason == protocol.Finish.STAGE_IN_FAILED else "job.stage_out_failed"
    event = AuditEvent.objects.filter(subject_id=job.pk, action=action).order_by("-created_at").first()
    detail = f"{event.data.get('reason')}: {event.data.get('detail')}" if event else ""
    return f"{reason} ({detail})"[:255] if detail else reason


# Ends that are not the job's doing: the shed's agent stopped it, or never got the server's
# confirmation to start it (an outage); each with what a renter is told if the job is lost.
STOPPED_BY_THE_SHED = {
    protocol.Finish.DRAINED: "the shed's agent was stopped while the job ran",
    protocol.Finish.AGENT_STOPPED: "the shed's agent was stopped while the job ran",
    protocol.Finish.START_UNCONFIRMED: "the shed could not reach the marketplace to start the job",
}


@transaction.atomic
def allocation_finish(*, allocation: Allocation, exit_code: int | None, reason: str) -> Job:
    """The agent reports the job's process has ended; its GPUs are free again."""
    job = Job.objects.select_for_update().get(pk=allocation.job_id)
    if reason.startswith(protocol.REFUSED):
        if allocation.released_at is None:
            _allocation_refused(allocation, job, reason=reason)
        return job  # nothing ran, so there is no usage; a repeated refusal changes nothing
    if allocation.released_at is not None:
        # A late or repeated report for an allocation already let go (its unit went offline, its
        # agent lost it, it finished before): what became of the job was decided then, and it
        # may be running elsewhere now. The report changes no state; its usage is still rated.
        ports.usage_due(allocation.pk)
        return job
    if reason in STOPPED_BY_THE_SHED and exit_code != 0 and job.state in Job.ACTIVE_STATES:
        # The owner stopped the agent while the job ran, or it could not start the job: not the
        # job failing, but a unit going away, so it is re-queued when restartable or never
        # started, else lost. One that exited 0 meanwhile is done.
        why = STOPPED_BY_THE_SHED[reason]
        _allocation_abandon(allocation, reason=reason, why=why, actor=f"unit:{allocation.unit_id}")
        ports.usage_due(allocation.pk)
        return Job.objects.get(pk=job.pk)
    # Stopped by the agent for the notice, whatever its exit code (a job that checkpoints on
    # SIGTERM may well exit 0): preempted, not done. A job that ended by itself meanwhile is done.
    if allocation.preempted_at is not None and reason == protocol.Finish.PREEMPTED and job.state in Job.ACTIVE_STATES:
        _allocation_preempted(allocation, job)
    else:
        # A job told to stop for residency (and ended meanwhile) is released as that, not "preempted".
        stopped_for = allocation.stop_reason if reason == protocol.Finish.PREEMPTED else ""
        _allocation_release(allocation, reason=stopped_for or reason or "finished", by_agent=True)
    if job.state in Job.ACTIVE_STATES:
        # Outputs not all uploaded: failed, however the job exited (never a partial upload as done).
        staging_failed = reason in (protocol.Finish.STAGE_IN_FAILED, protocol.Finish.STAGE_OUT_FAILED)
        job.state = Job.State.SUCCEEDED if exit_code == 0 and not staging_failed else Job.State.FAILED
        job.exit_code = exit_code
        job.finished_at = timezone.now()
        if staging_failed:
            job.failure_reason = _staging_failure(job, reason)
        elif job.state == Job.State.FAILED:
            why = reason or protocol.Finish.EXITED
            job.failure_reason = why[:255] if exit_code is None else f"exit code {exit_code}"
        job.save(update_fields=["state", "exit_code", "finished_at", "failure_reason"])
        audit_record(f"job.{job.state}", job.id, actor=f"unit:{allocation.unit_id}", exit_code=exit_code)
    elif job.state == Job.State.CANCELLED and job.exit_code is None:
        job.exit_code = exit_code
        job.save(update_fields=["exit_code"])
    ports.usage_due(allocation.pk)
    return job


def _allocation_preempted(allocation: Allocation, job: Job) -> None:
    """A job the server told to stop has stopped: for an on-demand job (whose slices they are
    first) or because the unit no longer meets its residency rules. It waits in the queue again;
    a stop that was not the job's doing is not one of its attempts."""
    reason = allocation.stop_reason or protocol.Finish.PREEMPTED
    if allocation.released_at is None:
        _allocation_release(allocation, reason=reason, by_agent=True)
    if allocation.preempted_by_id is not None:
        placement_request(allocation.preempted_by_id)
    job.state, job.placed_at, job.started_at = Job.State.QUEUED, None, None
    job.attempts = max(job.attempts - 1, 0)
    job.save(update_fields=["state", "placed_at", "started_at", "attempts"])
    audit_record("job.requeued", job.id, actor=f"unit:{allocation.unit_id}", reason=reason)
    placement_request(job.id)


def _allocation_refused(allocation: Allocation, job: Job, *, reason: str) -> None:
    """The unit's agent would not run the job (residency, isolation, devices, limits): free the
    slices and queue the job again. A refusal is not one of the job's attempts, so no unit can
    make a job fail by refusing it; placement keeps the refusing unit away from the job instead
    (``placement.record.units_that_refused``), and the refusal counts against the unit's
    reliability."""
    _allocation_release(allocation, reason=reason, by_agent=True)
    actor = f"unit:{allocation.unit_id}"
    audit_record(
        "allocation.refused",
        job.id,
        actor=actor,
        allocation=str(allocation.pk),
        unit=str(allocation.unit_id),
        reason=reason,
    )
    if job.state not in Job.ACTIVE_STATES:
        return
    job.state, job.placed_at, job.started_at = Job.State.QUEUED, None, None
    job.attempts, job.refusals = max(job.attempts - 1, 0), job.refusals + 1
    job.save(update_fields=["state", "placed_at", "started_at", "attempts", "refusals"])
    audit_record("job.requeued", job.id, actor=actor, reason=reason, attempts=job.attempts)
    placement_request(job.id)


def allocations_to_preempt(*, unit: Unit, running_ids: list) -> list:
    """Of the allocations the agent says it runs, the interruptible ones placement asked to
    stop for an on-demand job: the agent's notice, repeated at every heartbeat until they end."""
    if not running_ids:
        return []
    stopping = Allocation.objects.filter(
        unit=unit, pk__in=running_ids, released_at__isnull=True, preempted_at__isnull=False
    ).values_list("pk", flat=True)
    return [str(pk) for pk in stopping]


def allocations_picked_up(*, unit: Unit) -> list:
    """(id, acknowledged_at) of the unit's allocations its agent picked up and that are not released."""
    return list(
        Allocation.objects.filter(unit=unit, released_at__isnull=True, acknowledged_at__isnull=False).values_list(
            "pk", "acknowledged_at"
        )
    )


def allocations_to_cancel(*, unit: Unit, running_ids: list) -> list:
    """Of the allocations the agent says it runs, those it should stop now."""
    if not running_ids:
        return []
    keep = Allocation.objects.filter(
        unit=unit, pk__in=running_ids, released_at__isnull=True, job__state__in=Job.ACTIVE_STATES
    ).values_list("pk", flat=True)
    keep = {str(pk) for pk in keep}
    return [str(pk) for pk in running_ids if str(pk) not in keep]


def _allocation_abandon(allocation: Allocation, *, reason: str, why: str, actor: str) -> None:
    """The job's process is gone without a finish report: free its slices, then re-queue a
    restartable job, or one the agent never confirmed starting (nothing of it ran), up to the
    attempt cap, and end the rest as lost.

    Billing stops at the last usage sample that arrived; nothing is charged for the silence.
    """
    _allocation_release(allocation, reason=reason)
    job = Job.objects.get(pk=allocation.job_id)
    active = Job.objects.filter(pk=job.pk, state__in=Job.ACTIVE_STATES)
    never_started = job.state in (Job.State.PLACED, Job.State.STARTING)
    if (job.restartable or never_started) and job.attempts < settings.JOB_MAX_ATTEMPTS:
        if active.update(state=Job.State.QUEUED, placed_at=None, started_at=None):
            audit_record("job.requeued", job.id, actor=actor, reason=reason, attempts=job.attempts)
            placement_request(job.id)
    elif active.update(state=Job.State.LOST, finished_at=timezone.now(), failure_reason=why):
        audit_record("job.lost", job.id, actor=actor, reason=reason)


@transaction.atomic
def unit_jobs_lost(*, unit: Unit) -> None:
    """The unit went offline: every job on it is abandoned."""
    for allocation in Allocation.objects.filter(unit=unit, released_at__isnull=True).select_related("job"):
        _allocation_abandon(allocation, reason="unit_offline", why="unit went offline", actor="liveness")


@transaction.atomic
def allocations_reconcile(*, unit: Unit, running_ids: list) -> None:
    """Abandon allocations the agent picked up a while ago but no longer reports as running or
    still reporting on: it lost them (a crash, or an assignment whose answer never arrived)."""
    picked_up_before = timezone.now() - settings.AGENT_LOST_GRACE
    forgotten = (
        Allocation.objects.filter(unit=unit, released_at__isnull=True, acknowledged_at__lt=picked_up_before)
        .exclude(pk__in=running_ids)
        .select_related("job")
    )
    for allocation in forgotten:
        _allocation_abandon(
            allocation, reason="agent_lost", why="the unit's agent no longer runs this job", actor=f"unit:{unit.pk}"
        )


@transaction.atomic
def allocations_expire_unacknowledged(*, now: datetime) -> int:
    """Release placements no agent picked up in time and queue their jobs again."""
    stale = Allocation.objects.filter(
        acknowledged_at__isnull=True, released_at__isnull=True, created_at__lt=now - settings.ASSIGNMENT_ACK_TIMEOUT
    )
    expired = 0
    for allocation in stale.select_related("job"):
        allocation_withdraw(allocation, reason="not_acknowledged", actor="liveness")
        expired += 1
    return expired


def allocation_withdraw(allocation: Allocation, *, reason: str, actor: str) -> None:
    """Take back a placement no agent has picked up, and queue its job again."""
    _allocation_release(allocation, reason=reason)
    if Job.objects.filter(pk=allocation.job_id, state=Job.State.PLACED).update(state=Job.State.QUEUED, placed_at=None):
        audit_record("job.requeued", allocation.job_id, actor=actor, reason=reason)
        placement_request(allocation.job_id)


# An operator's drain that stops the unit's jobs, told to the agent as a notice like a
# preemption's; the release counts against the unit as the owner's own drain does.
DRAIN_STOP = protocol.Finish.DRAINED
# Failure reasons of jobs the platform stopped (residency.py's, and a drain's below): not the
# renter's doing, so an operator may queue them again.
PLATFORM_STOPS = ("residency:", "drain:")


@transaction.atomic
def unit_jobs_stop(*, unit: Unit, actor: str) -> list[Job]:
    """Stop every job on a unit an operator drains because it misbehaves. Nothing of it is the
    renters' doing: a job its agent has not picked up is withdrawn and queued again at once; one
    it has is told to stop (a notice, after which nothing is billed) and is queued again when the
    agent reports it stopped, unless it may not run twice (not restartable): that one fails, and
    says why, as a residency stop does. Jobs are locked one at a time, in key order."""
    now, stopped = timezone.now(), []
    active = Allocation.objects.filter(unit=unit, released_at__isnull=True).order_by("job_id")
    for allocation in active:
        job = Job.objects.select_for_update().get(pk=allocation.job_id)
        if job.is_final:
            continue
        if allocation.acknowledged_at is None:
            allocation_withdraw(allocation, reason=DRAIN_STOP, actor=actor)
        elif Allocation.objects.filter(pk=allocation.pk, released_at__isnull=True, preempted_at__isnull=True).update(
            preempted_at=now, stop_reason=DRAIN_STOP
        ):
            if not job.restartable:
                job_stop(job=job, actor=actor, reason="drain: its unit was drained by an operator while it ran")
        else:
            continue  # already being stopped (preempted, or for residency)
        audit_record("job.drain_stopped", job.id, actor=actor, unit=str(unit.pk), allocation=str(allocation.pk))
        stopped.append(job)
    streams.nudge([unit.pk])
    return stopped


@transaction.atomic
def job_requeue(*, job: Job, actor: str) -> Job:
    """An operator queues a job again that ended or stalled through no doing of its renter: lost
    (its unit went away), failed because the platform stopped it (``PLATFORM_STOPS``), or placed
    on a unit whose agent has not picked it up. A queued job is offered to placement again.

    Refused for a job its agent has (starting, running): it may be running, and queuing it would
    run it twice; cancel it, or drain its unit stopping jobs, instead. Refused too for a job that
    ended by its renter's doing (its exit code, a cancel, its wallet, its secrets)."""
    job = Job.objects.select_for_update().get(pk=job.pk)
    previous = job.state
    if job.state == Job.State.QUEUED:
        audit_record("job.placement_requested", job.id, actor=actor)
        placement_request(job.id)
        return job
    if job.state in (Job.State.STARTING, Job.State.RUNNING):
        raise StateConflict(
            f"The job is {job.state}: its unit's agent has it and it may be running, so it is not queued twice. "
            "Cancel it, or drain its unit stopping its jobs."
        )
    if job.state == Job.State.PLACED:
        allocation = _active_allocation(job)
        if allocation is None or allocation.acknowledged_at is not None:
            raise StateConflict("The job's unit has picked it up meanwhile: it may be running, so it is not queued.")
        allocation_withdraw(allocation, reason="requeued", actor=actor)
        return Job.objects.get(pk=job.pk)
    if job.state != Job.State.LOST and not (
        job.state == Job.State.FAILED and job.failure_reason.startswith(PLATFORM_STOPS)
    ):
        why = job.failure_reason or (f"exit code {job.exit_code}" if job.exit_code is not None else job.state)
        raise StateConflict(
            f"The job ended by its renter's doing ({why}): only lost jobs and jobs the platform stopped are "
            "queued again."
        )
    job.state, job.placed_at, job.started_at, job.finished_at = Job.State.QUEUED, None, None, None
    job.exit_code, job.failure_reason = None, ""
    # One more attempt at least, so a job lost at its last attempt is not lost again for it.
    job.attempts = min(job.attempts, settings.JOB_MAX_ATTEMPTS - 1)
    job.save(
        update_fields=["state", "placed_at", "started_at", "finished_at", "exit_code", "failure_reason", "attempts"]
    )
    audit_record("job.requeued", job.id, actor=actor, reason="operator", previous=previous, attempts=job.attempts)
    placement_request(job.id)
    return job


def liveness_followup(*, now: datetime) -> None:
    """After the liveness sweep (``nodes.ports.liveness_swept``): release placements no agent
    picked up, and deal with the jobs of units gone offline."""
    allocations_expire_unacknowledged(now=now)
    # Driven by state rather than by what was just marked, so work left by an interrupted
    # sweep is picked up by the next one.
    # allocations__released_at__isnull alone would also match units with no allocations at all
    # (an outer join), so every unit ever lost would be revisited on every sweep.
    stranded = Unit.objects.filter(
        status=Unit.Status.OFFLINE, allocations__isnull=False, allocations__released_at__isnull=True
    )
    for unit in stranded.distinct():
        unit_jobs_lost(unit=unit)


LOG_MAX_CHARS = 2**20  # of one allocation's output kept; the agent stops shipping once told


def log_chunk_record(*, allocation: Allocation, offset: int, data: str) -> tuple[bool, bool]:
    """Keep a chunk of a job's output once per (allocation, offset); returns (stored, truncated).

    Past LOG_MAX_CHARS nothing more is kept. Two chunks arriving at once may both fit the check
    and overshoot the cap by one chunk, which is cheaper than locking the allocation per chunk.
    """
    room = LOG_MAX_CHARS - allocation_log_size(allocation)
    if room <= 0:
        return False, True
    if LogChunk.objects.filter(allocation=allocation, offset=offset).exists():
        return False, False
    try:
        with transaction.atomic():
            LogChunk.objects.create(allocation=allocation, offset=offset, data=data[:room])
    except IntegrityError:
        return False, False  # the same chunk arrived concurrently
    return True, len(data) > room
