"""The agent's single-threaded main loop: heartbeat, pull, start, watch, report."""

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodes.agent import job_secrets, logs, logship, staging
from nodes.agent.allocations import Allocation, InvalidAssignment, held_slots, parse_assignment
from nodes.agent.backoff import Backoff
from nodes.agent.backyard import Backyard, GpuReading, Policy
from nodes.agent.client import AgentClient, AgentError, Conflict
from nodes.agent.gpus import Gpu, Inventory, InventoryError
from nodes.agent.heartbeat import Heartbeater
from nodes.agent.protocol import Finish, Refused, Staging
from nodes.agent.recovery import Journal
from nodes.agent.refusal import LocalPolicy, refuse_unfit
from nodes.agent.reports import Outbox, Reporter
from nodes.agent.runtime import Housekeeping, JobSpec, Ports, Pulling, Runtime, Scratch, StartFailed
from nodes.agent.runtime.container_logs import in_background
from nodes.agent.runtime.environment import masks, redact
from nodes.agent.staging import DataPolicy, StagingError
from nodes.agent.status import StatusWriter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    usage_interval_s: float = 10.0
    max_jobs: int | None = None
    tick_s: float = 0.25
    poll_wait_s: int = 1
    start_give_up_s: float = 60.0
    drain_report_timeout_s: float = 30.0
    error_base_s: float = 1.0  # first retry delay after a failed call; doubles per failure
    drain: str = "wait"  # on SIGTERM, "wait" for running jobs or "stop" them (SIGTERM, reported as drained)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Agent:
    def __init__(
        self,
        client: AgentClient,
        runtime: Runtime,
        gpus: list[Gpu],
        options: Options | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], str] = utc_now,
        rng: Callable[[], float] = random.random,
        policy: LocalPolicy | None = None,
        status_path: Path | None = None,
        state_dir: Path | None = None,
        inventory: Inventory | None = None,
        data: DataPolicy | None = None,
    ) -> None:
        self.options = options or Options()
        self._data = data or DataPolicy()
        self.gpus = gpus
        self.policy = policy or LocalPolicy()
        self.allocations: dict[str, Allocation] = {}
        base_s = self.options.error_base_s
        outbox = Outbox(state_dir / "outbox" if state_dir else None)
        self.reporter = Reporter(client, outbox, clock=clock, backoff=Backoff(base_s=base_s, cap_s=60.0, rng=rng))
        self._journal = Journal(state_dir / "allocations" if state_dir else None, runtime)
        self.heartbeater = Heartbeater(
            client, gpus, clock=clock, rng=rng, error_base_s=base_s, country=self.policy.country
        )
        self._client = client
        self._stream = client.stream
        self._runtime = runtime
        self._clock, self._sleep, self._wall, self._rng = clock, sleep, wall, rng
        self._pull_backoff = Backoff(base_s=base_s, cap_s=30.0, rng=rng)
        self._next_pull_at = 0.0
        self._taken = 0
        self._stopping = False
        self._idle_since: float | None = None
        self._stop_jobs_as: str | None = None  # set by stop(), acted on by the next tick
        # The backyard limits in force (quiet hours, power budget, thermal derating); `status` shows them.
        self.limits: dict[str, Any] = {}
        self._inventory = inventory
        self._backyard = Backyard()
        self._advertise: list[str] | None = None  # GPUs open to new work; None until limits are known
        self._status = StatusWriter(status_path, gpus, clock=clock) if status_path else None
        if self._stream is not None:
            self._stream.serve_ports(self.port_address)

    def run(self) -> int:
        logs.event(logger, "agent_started", gpus=len(self.gpus), max_jobs=self.options.max_jobs)
        try:
            self._recover()
        except Exception:
            # Jobs that cannot be recovered are given up by the server after its grace period.
            logger.exception("event=recovery_failed")
        while not self._done():
            try:
                self.tick()
            except Exception:
                # A bug in one step must not stop the reports of jobs already running.
                logger.exception("event=tick_failed")
            self._sleep(self.options.tick_s)
        unsent = len(self.reporter.outbox)
        level = logging.WARNING if unsent else logging.INFO
        logs.event(logger, "agent_stopped", level, jobs=self._taken, unsent_reports=unsent)
        return 0

    def stop(self, force: bool = False) -> None:
        """Take no new work and drain: let running jobs finish, or with the "stop" drain policy
        ask them to stop (their chance to checkpoint); with force, kill them.

        Called from signal handlers, so it only records what to do; the next tick does it.
        """
        if not self._stopping:
            logs.event(logger, "draining", running=len(self.allocations), policy=self.options.drain)
        self._stopping = True
        if force:
            self._stop_jobs_as = Finish.AGENT_STOPPED
        elif self.options.drain == "stop":
            self._stop_jobs_as = self._stop_jobs_as or Finish.DRAINED

    def tick(self) -> None:
        if self._stop_jobs_as:
            for allocation in list(self.allocations.values()):
                self._stop(allocation, self._stop_jobs_as)
        was_healthy = self.heartbeater.healthy
        if self._stopping and self._advertise != []:
            self._advertise = []  # draining: no new work here; the server hears it at once
            self.heartbeater.beat_now()
        if self.heartbeater.due():
            self._apply_limits()
        beat = {"gpus": self.gpus, "advertise": self._advertise, "limits": self.limits}
        policy = self.heartbeater.policy
        for allocation_id in self.heartbeater.beat_if_due(self._claimed(), **beat):
            self._cancel(allocation_id)
        for state in self._stream.states() if self._stream else ():
            for allocation_id in self.heartbeater.pushed(state):
                self._cancel(allocation_id)
        if self.heartbeater.policy != policy:
            self._apply_limits()  # before pulling: the owner's new policy may close GPUs at once
        if self.heartbeater.healthy and not was_healthy:
            self.reporter.retry_now()  # the server answers again: no need to sit out the backoff
        self._start_pending()
        self._supervise()
        self.reporter.flush()
        self._pull()
        if isinstance(self._runtime, Housekeeping):
            self._runtime.housekeep()
        if self._status:
            connection = f"stream {self._stream.state}" if self._stream else "http polling (stream off)"
            self._status.update(self.heartbeater, list(self.allocations.values()), self.limits, connection)

    def _apply_limits(self) -> None:
        """Fresh readings, then the owner's backyard limits: which GPUs may take new work, and
        the power cap during quiet hours."""
        if self._inventory is not None:
            try:
                self.gpus = self._inventory.read()
            except InventoryError as exc:
                logs.event(logger, "inventory_failed", logging.WARNING, error=exc)
        readings = [GpuReading(g.uuid, g.healthy, g.temperature_c, g.power_w, g.power_limit_w) for g in self.gpus]
        busy = set(held_slots(list(self.allocations.values())))
        policy = Policy.from_server(self.heartbeater.policy)
        # A GPU an interruptible job holds is room for an on-demand one: the server stops that job
        # for it (a preemption), which it can only where the GPU stays advertised.
        room = set(self._free_gpus([a for a in self.allocations.values() if not a.spec.interruptible]))
        limits = self._backyard.evaluate(policy, readings, busy, datetime.now(UTC), room=room)
        report = limits.report(total=len(self.gpus))
        if report != self.limits:
            in_force = ",".join(limits.in_force) or "none"
            logs.event(logger, "limits_changed", in_force=in_force, advertised=len(limits.advertise))
        # Draining: nothing open to new work (an assignment that crossed the drain is refused).
        self.limits, self._advertise = report, [] if self._stopping else limits.advertise
        if self._inventory is not None:
            for problem in self._inventory.cap_power(limits.power_cap_w):
                logs.event(logger, "power_cap_failed", logging.WARNING, error=problem)

    def _open_to_work(self) -> dict[str, Gpu]:
        """Free GPUs that the backyard limits let take new work."""
        free = self._free_gpus()
        if self._advertise is None:
            return free
        return {uuid: gpu for uuid, gpu in free.items() if uuid in self._advertise}

    def _claimed(self) -> list[str]:
        """What the heartbeat says this agent holds: jobs it runs and jobs whose last reports
        are still on their way, so the server does not take either for lost."""
        unreported = [a for a in self.reporter.outbox.allocation_ids() if a not in self.allocations]
        return [*self.allocations, *unreported]

    def _winding_down(self) -> bool:
        limit = self.options.max_jobs
        return self._stopping or (limit is not None and self._taken >= limit)

    def _done(self) -> bool:
        if not self._winding_down() or self.allocations:
            return False
        if not self.reporter.outbox:
            return True
        now = self._clock()
        self._idle_since = self._idle_since if self._idle_since is not None else now
        return now - self._idle_since >= self.options.drain_report_timeout_s

    def _free_gpus(self, allocations: list[Allocation] | None = None) -> dict[str, Gpu]:
        """GPUs with room for another job: not held whole by `allocations` (by default all this
        agent runs; a MIG instance or a share of one may still be free; the server knows which)."""
        held = held_slots(list(self.allocations.values()) if allocations is None else allocations)
        return {gpu.uuid: gpu for gpu in self.gpus if gpu.uuid not in held.get(gpu.uuid, set())}

    def _pull(self) -> None:
        if self._stream is not None:
            for data in self._stream.assignments():  # pushed: the server has handed them to us
                self._take(data)
            if self._stream.connected:
                return  # no poll: the stream pushes the next one
        now = self._clock()
        if self._winding_down() or not self.heartbeater.healthy or now < self._next_pull_at:
            return
        if not self._open_to_work():
            return
        # However fast the server answers "no work", ask at most once per poll_wait_s.
        self._next_pull_at = now + self.options.poll_wait_s
        try:
            data = self._client.next_assignment(wait_s=self.options.poll_wait_s)
        except AgentError as exc:
            delay = self._pull_backoff.failure(at_least=getattr(exc, "retry_after", 0.0))
            self._next_pull_at = self._clock() + delay
            logs.event(logger, "pull_failed", logging.WARNING, retry_in_s=round(delay, 2), error=exc)
            return
        self._pull_backoff.success()
        if data is not None:
            self._next_pull_at = now  # there may be more work queued for our other GPUs
            self._take(data)

    def _take(self, data: dict[str, Any]) -> None:
        # Even if a drain began meanwhile: the server has handed this job to us, and dropping it
        # would strand it until the server gives up on it.
        self._taken += 1
        self._accept(data)

    def _accept(self, data: dict[str, Any]) -> None:
        try:
            inventory = {gpu.uuid: gpu for gpu in self.gpus}
            allocation = parse_assignment(data, inventory, self._clock(), held_slots(list(self.allocations.values())))
            refuse_unfit(allocation, self.gpus, self.policy)
            self._refuse_over_limits(allocation)
        except InvalidAssignment as exc:
            self._log_refusal(exc)
            if exc.allocation_id:
                self.reporter.finish(str(exc.allocation_id), None, exc.reason)
            return
        allocation.start_backoff = Backoff(base_s=self.options.error_base_s, cap_s=10.0, rng=self._rng)
        logs.event(
            logger,
            "assigned",
            allocation=allocation.id,
            job=allocation.spec.job_id,
            gpus=[gpu.index for gpu in allocation.gpus],
        )
        self.allocations[allocation.id] = allocation
        self._try_start(allocation)

    def _log_refusal(self, exc: InvalidAssignment) -> None:
        logs.event(
            logger, "assignment_refused", logging.ERROR, allocation=exc.allocation_id, reason=exc.reason, error=exc
        )

    def _refuse_over_limits(self, allocation: Allocation) -> None:
        """A limit that came into force after the server placed the job (heat, quiet hours,
        power) wins: refuse, and the server places the job again, here later or elsewhere."""
        open_to_work = self._open_to_work()
        if any(gpu.uuid not in open_to_work for gpu in allocation.gpus):
            in_force = ",".join(self.limits.get("in_force", [])) or "none"
            raise InvalidAssignment(f"backyard limits in force: {in_force}", allocation.id, Refused.LIMITS)

    def _start_pending(self) -> None:
        now = self._clock()
        for allocation in list(self.allocations.values()):
            if allocation.handle is None and now >= allocation.next_start_at:
                self._try_start(allocation)

    def _runs_in(self, spec) -> str:
        runs_in = getattr(self._runtime, "runs_in", None)
        return runs_in(spec) if runs_in is not None else ""

    def _try_start(self, allocation: Allocation) -> None:
        if not self._secrets_ready(allocation) or not self._image_ready(allocation):
            return
        if not self._inputs_ready(allocation):
            return
        digest = allocation.pull.result() if allocation.pull is not None else None
        try:
            self._client.start(allocation.id, digest, self._runs_in(allocation.spec))
        except AgentError as exc:
            self._start_refused(allocation, exc)
            return
        self._journal.save_starting(allocation)
        secrets = allocation.given_secrets
        try:
            handle = self._runtime.start(allocation.spec, secrets)
        except StartFailed as exc:
            error = redact(str(exc), secrets)
            logs.event(logger, "start_failed", logging.ERROR, allocation=allocation.id, error=error)
            self._journal.forget(allocation.id)
            self._abandon(allocation, Finish.START_FAILED)
            return
        allocation.mark_started(handle, self._clock(), self._wall())
        self._journal.save(allocation)
        logs.event(logger, "job_started", allocation=allocation.id, job=allocation.spec.job_id)

    def _secrets_ready(self, allocation: Allocation) -> bool:
        """Whether the job has the values of its secrets, asked for now if not: it never starts
        without them. The server answers 409 for an allocation it has ended meanwhile (a cancel,
        or a secret gone, for which it fails the job itself)."""
        if not allocation.awaiting_secrets:
            return True
        try:
            allocation.secrets = job_secrets.fetch(self._client, allocation.spec)
        except InvalidAssignment as exc:
            self._log_refusal(exc)
            self._abandon(allocation, exc.reason)
            return False
        except Conflict as exc:
            logs.event(logger, "secrets_refused", logging.WARNING, allocation=allocation.id, error=exc)
            self._abandon(allocation, Finish.CANCELLED)
            return False
        except AgentError as exc:
            self._start_refused(allocation, exc)
            return False
        return True

    def _image_ready(self, allocation: Allocation) -> bool:
        """Whether the job's image is here, its pull begun now if not (with the job's registry
        credential, if it has one). The start names the image's digest, so it waits for the pull,
        which is none of the renter's time. A runtime that runs no images has it at once."""
        if not isinstance(self._runtime, Pulling):
            return True
        if allocation.pull is None:
            registry = allocation.secrets.registry if allocation.secrets is not None else None
            allocation.pull = self._runtime.pull(allocation.spec, registry)
        if not allocation.pull.done():
            return False
        failure = allocation.pull.exception()
        if failure is not None:
            self._image_failed(allocation, failure)
            return False
        if allocation.ready_at is None:
            allocation.ready_at = self._clock()
        return True

    def _image_failed(self, allocation: Allocation, failure: BaseException) -> None:
        """End a job whose image cannot run it, unstarted, and tell the renter why in its log
        where the runtime said so in words for them."""
        error = redact(f"{failure}", allocation.given_secrets)
        logs.event(logger, "start_failed", logging.ERROR, allocation=allocation.id, error=error)
        if isinstance(failure, StartFailed):
            line = f"shedshare: the job did not start: {error}\n"
            self.reporter.logs(allocation.id, 0, len(line.encode()), line)
        self._abandon(allocation, Finish.START_FAILED)

    def _inputs_ready(self, allocation: Allocation) -> bool:
        """Whether the job's data is staged: its scratch made and its inputs fetched into it, in
        the background and before the start, so the renter pays for none of it. A job whose
        inputs cannot all be fetched never starts."""
        spec = allocation.spec
        if allocation.staged_in or not (spec.inputs or spec.outputs):
            return True
        if allocation.staging is None:
            allocation.staging = in_background(f"stage-in-{allocation.id}", lambda: self._stage_in(spec))
        if not allocation.staging.done():
            return False
        report = self._staging_report(allocation, "in")
        if spec.inputs or not report["ok"]:
            self.reporter.staging(allocation.id, report)
        if not report["ok"]:
            self._abandon(allocation, Finish.STAGE_IN_FAILED)
            return False
        allocation.staged_in = True
        allocation.ready_at = self._clock()  # like a pull, a long fetch is no outage
        return True

    def _stage_in(self, spec: JobSpec) -> dict[str, Any]:
        if not isinstance(self._runtime, Scratch):
            raise StartFailed("this unit's runtime keeps no scratch for a job's data")
        scratch = self._runtime.make_scratch(spec)
        return staging.stage_in(list(spec.inputs), scratch, self._data, clock=self._clock)

    def _stage_out(self, spec: JobSpec) -> dict[str, Any]:
        assert isinstance(self._runtime, Scratch)
        return staging.stage_out(list(spec.outputs), self._runtime.scratch(spec), self._data, clock=self._clock)

    def _staging_report(self, allocation: Allocation, phase: str) -> dict[str, Any]:
        """The finished staging's report. One that broke (no scratch, a full disk, a bug) is told
        to the renter in general words; the owner's log has the error."""
        assert allocation.staging is not None
        future, allocation.staging = allocation.staging, None
        failure = future.exception()
        if failure is None:
            report = future.result()
        else:
            logs.event(logger, "staging_broke", logging.ERROR, allocation=allocation.id, phase=phase, error=failure)
            why = "the shed could not keep the job's data" if phase == "in" else "the shed no longer has the outputs"
            reason = Staging.SCRATCH_FULL if phase == "in" else Staging.MISSING
            report = staging.report(phase, [], StagingError(reason, why), 0.0)
        level = logging.INFO if report["ok"] else logging.WARNING
        files, seconds = len(report["files"]), round(report["seconds"], 3)
        event = f"staged_{phase}" if report["ok"] else f"stage_{phase}_failed"
        logs.event(
            logger, event, level, allocation=allocation.id, files=files, seconds=seconds, detail=report["detail"]
        )
        return report

    def _start_refused(self, allocation: Allocation, exc: AgentError) -> None:
        now = self._clock()
        since = allocation.accepted_at if allocation.ready_at is None else allocation.ready_at
        if exc.retryable and now - since < self.options.start_give_up_s:
            allocation.next_start_at = now + allocation.start_backoff.failure()
            logs.event(logger, "start_retry", logging.WARNING, allocation=allocation.id, error=exc)
            return
        logs.event(logger, "start_refused", logging.WARNING, allocation=allocation.id, error=exc)
        self._abandon(allocation, Finish.START_UNCONFIRMED if exc.retryable else Finish.START_FAILED)

    def _abandon(self, allocation: Allocation, reason: str) -> None:
        """Give up an allocation whose job never ran: no usage, just the finish."""
        del self.allocations[allocation.id]
        self.reporter.finish(allocation.id, None, reason)
        if isinstance(self._runtime, Scratch) and (allocation.spec.inputs or allocation.spec.outputs):
            spec, runtime = allocation.spec, self._runtime
            if allocation.staging is None:
                runtime.drop_scratch(spec)
            else:  # a fetch under way: its folder goes once it stops writing there
                allocation.staging.add_done_callback(lambda _: runtime.drop_scratch(spec))

    def _supervise(self) -> None:
        for allocation in list(self.allocations.values()):
            if allocation.handle is None:
                continue
            if allocation.exit_code is not None:
                self._wind_up(allocation)
                continue
            now = self._clock()
            code = self._runtime.poll(allocation.handle)
            if code is not None:
                self._complete(allocation, code, now)
                continue
            if allocation.stop_reason is None and allocation.overdue(now):
                self._stop(allocation, Finish.TIMEOUT)
            if now - allocation.last_sample_at >= self.options.usage_interval_s:
                self._report_progress(allocation, now)
                self._journal.save(allocation)

    def _report_progress(self, allocation: Allocation, now: float, final: bool = False) -> None:
        for sample in allocation.samples(now, self._wall()):
            self.reporter.usage(allocation.id, sample)
        # A runtime whose handles keep no log file ships no logs.
        log_path = getattr(allocation.handle, "log_path", None)
        if log_path is None or allocation.id in self.reporter.logs_truncated:
            return
        if allocation.awaiting_secrets:
            self._secrets_again(allocation, final)
        if allocation.awaiting_secrets:
            return  # the log cannot be scrubbed: it waits on the shed
        values = masks(allocation.given_secrets)
        for chunk in logship.new_chunks(log_path, allocation.log_offset, final=final, masks=values):
            self.reporter.logs(allocation.id, chunk.offset, chunk.end, chunk.data)
            allocation.log_offset = chunk.end

    def _secrets_again(self, allocation: Allocation, final: bool) -> None:
        """Ask again for the secrets of a job adopted after a restart, which only scrubbing its
        log needs. Until the server gives them, asked at every usage report, the log is not
        shipped: better late, or never for a job that ends meanwhile, than with a secret in it."""
        try:
            allocation.secrets = job_secrets.fetch(self._client, allocation.spec)
        except (InvalidAssignment, AgentError) as exc:
            event = "logs_withheld" if final else "secrets_unavailable"
            logs.event(logger, event, logging.WARNING, allocation=allocation.id, error=exc)

    def _complete(self, allocation: Allocation, exit_code: int, now: float) -> None:
        """The job exited: its usage and log end here (the upload of its outputs is none of the
        renter's time), then its outputs go, then its finish."""
        assert allocation.handle is not None
        allocation.exit_code, allocation.exit_reason = exit_code, allocation.stop_reason or Finish.EXITED
        self._report_progress(allocation, now, final=True)
        self._journal.save(allocation)  # a restart during the upload bills nothing twice
        self._wind_up(allocation)

    def _wind_up(self, allocation: Allocation) -> None:
        """Upload the outputs of a job that exited on its own, in the background, then report its
        finish and clean up. A stopped job (cancelled, preempted, timed out, drained) did not
        finish its work: nothing of it is uploaded. A failed upload fails the job, whatever its
        exit code: a partial result is never presented as complete."""
        assert allocation.handle is not None and allocation.exit_code is not None
        exit_code, reason = allocation.exit_code, allocation.exit_reason
        if reason == Finish.EXITED and allocation.spec.outputs:
            if allocation.staging is None:
                spec = allocation.spec
                allocation.staging = in_background(f"stage-out-{allocation.id}", lambda: self._stage_out(spec))
            if not allocation.staging.done():
                return
            report = self._staging_report(allocation, "out")
            self.reporter.staging(allocation.id, report)
            reason = reason if report["ok"] else Finish.STAGE_OUT_FAILED
        self.reporter.finish(allocation.id, exit_code, reason)
        self._runtime.cleanup(allocation.handle)
        self._journal.forget(allocation.id)
        del self.allocations[allocation.id]
        logs.event(
            logger,
            "job_finished",
            allocation=allocation.id,
            exit_code=exit_code,
            reason=reason,
            gpu_ms=allocation.metered_ms * len(allocation.gpus),
        )

    def _cancel(self, allocation_id: str) -> None:
        """Stop what the server asked to stop: as "preempted" when it wants the room for an
        on-demand job (the SIGTERM is the job's notice to checkpoint; the server re-queues it),
        else as "cancelled"."""
        allocation = self.allocations.get(allocation_id)
        if allocation is None:
            logs.event(logger, "cancel_ignored", logging.DEBUG, allocation=allocation_id)
            return
        if allocation_id not in self.heartbeater.preempting:
            self._stop(allocation, Finish.CANCELLED)
            return
        if allocation.stop_reason is None:  # once, however often the notice comes
            logs.event(logger, "job_preempted", allocation=allocation.id, job=allocation.spec.job_id)
        self._stop(allocation, Finish.PREEMPTED)

    def port_address(self, allocation_id: str, port: int) -> "tuple[str, int] | str":
        """Where a relay channel reaches `port` of a job running here, or why it cannot (called
        from the relay's threads: reads only)."""
        allocation = self.allocations.get(allocation_id)
        if allocation is None or allocation.handle is None or allocation.stop_reason is not None:
            return "the job is not running here"
        if port not in allocation.spec.ports:
            return f"the job declared no port {port}"
        if not isinstance(self._runtime, Ports):
            return "this agent's runtime serves no ports"
        try:
            return self._runtime.port_address(allocation.handle, port)
        except StartFailed as exc:
            return str(exc)

    def _stop(self, allocation: Allocation, reason: str) -> None:
        if allocation.handle is None:
            self._abandon(allocation, reason)
            return
        if allocation.stop_reason is None:
            allocation.stop_reason = reason
            if self._stream is not None:
                self._stream.drop_channels(allocation.id)  # it serves no one from now on
            self._runtime.kill(allocation.handle)
            self._journal.save(allocation)
            logs.event(logger, "job_stopping", allocation=allocation.id, reason=reason)

    def _recover(self) -> None:
        """Pick up the jobs a previous run of the agent left: adopt those still running, report
        those that ended meanwhile, and those that vanished (a reboot) as lost."""
        now = self._clock()
        for found in self._journal.recover(self.reporter.outbox, self.gpus, now, self._wall()):
            allocation = found.allocation
            if allocation is None:
                logs.event(logger, "job_lost_on_restart", logging.WARNING, allocation=found.allocation_id)
                self.reporter.finish(found.allocation_id, None, "lost_on_restart")
                self._journal.forget(found.allocation_id)
                continue
            logs.event(logger, "job_adopted", allocation=allocation.id, exited=found.exit_code is not None)
            self.allocations[allocation.id] = allocation
            if found.exit_code is not None:
                self._complete(allocation, found.exit_code, now)
            elif allocation.stop_reason is not None and allocation.handle is not None:
                self._runtime.kill(allocation.handle)  # finish stopping what the last run began
