"""A restarted agent finds its jobs again from its state folder: the real loop and process runtime
against the fake server, the "crash" being the loop torn down at a chosen moment."""

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodes.agent import gpus
from nodes.agent.allocations import Allocation
from nodes.agent.client import AgentClient
from nodes.agent.loop import Agent, Options
from nodes.agent.outbox import Outbox, Report
from nodes.agent.recovery import Journal
from nodes.agent.runtime import Adopted, JobSpec
from nodes.agent.runtime.environment import Secrets
from nodes.agent.runtime.process import ProcessRuntime
from tests.agent.fakes import CREDENTIAL, HONOURS_ALL, FakeServer

FAST = Options(usage_interval_s=0.2, tick_s=0.02, poll_wait_s=0, error_base_s=0.05)


class Killed(BaseException):
    """Like kill -9: nothing in the agent gets to handle it."""


def agent_on(server: FakeServer, tmp_path: Path, until: Callable[[Agent], bool], options: Options = FAST) -> Agent:
    """An agent on tmp_path's state folder whose loop dies once `until(agent)` holds."""
    client = AgentClient("http://shed.test", CREDENTIAL, transport=server.transport())
    runtime = ProcessRuntime(tmp_path / "work", tmp_path / "state" / "logs", kill_grace_s=1.0)
    deadline = time.monotonic() + 90  # a guard against a hung loop, far above any test's need

    def sleep(seconds: float) -> None:
        assert time.monotonic() < deadline, "the agent loop did not get there in time"
        if until(agent):
            raise Killed
        time.sleep(seconds)

    state_dir = tmp_path / "state"
    agent = Agent(client, runtime, server.inventory, options, sleep=sleep, policy=HONOURS_ALL, state_dir=state_dir)
    return agent


def run_until_killed(agent: Agent) -> None:
    with pytest.raises(Killed):
        agent.run()


def reported(allocation_id: str, server: FakeServer) -> Callable[[Agent], bool]:
    return lambda agent: allocation_id in server.finished and not agent.reporter.outbox


def seqs(server: FakeServer, allocation_id: str) -> list[int]:
    return sorted(server.samples[allocation_id])


def gpu_ms(server: FakeServer, allocation_id: str) -> int:
    return sum(s["gpu_ms"] for s in server.samples[allocation_id].values())


def test_a_job_that_outlives_the_agent_is_adopted_and_billed_once_for_all_its_time(server, tmp_path):
    allocation_id = server.assign(["sh", "-c", "sleep 1.5"], gpu_count=2)
    began = time.monotonic()
    run_until_killed(agent_on(server, tmp_path, until=lambda agent: len(server.samples[allocation_id]) >= 2))
    time.sleep(0.5)  # the agent is away while the job runs on
    beats_before = len(server.heartbeats)

    run_until_killed(agent_on(server, tmp_path, until=reported(allocation_id, server)))

    assert server.started == [allocation_id]
    assert server.finished[allocation_id] == {"exit_code": 0, "reason": "exited"}
    assert seqs(server, allocation_id) == list(range(1, len(seqs(server, allocation_id)) + 1))
    took_ms = int((time.monotonic() - began) * 1000) + 1
    assert 2 * 1500 <= gpu_ms(server, allocation_id) <= 2 * took_ms
    assert allocation_id in server.heartbeats[beats_before]["running"]
    assert not list((tmp_path / "state" / "allocations").iterdir())


def test_a_job_that_ended_while_the_agent_was_away_is_billed_until_it_ended(server, tmp_path):
    allocation_id = server.assign(["sh", "-c", "sleep 0.3; exit 5"], gpu_count=1)
    run_until_killed(agent_on(server, tmp_path, until=lambda agent: bool(server.started)))
    away_s = 4.0
    time.sleep(away_s)  # the job ends early in this absence

    run_until_killed(agent_on(server, tmp_path, until=reported(allocation_id, server)))

    assert server.finished[allocation_id] == {"exit_code": 5, "reason": "exited"}
    # Billed for its own 0.3 s (however slowly a busy machine ran it), not for the agent's absence.
    assert 300 <= gpu_ms(server, allocation_id) < away_s * 1000


def test_a_job_gone_without_a_trace_is_reported_lost_on_restart(server, tmp_path):
    allocation_id = server.assign(["sleep", "30"], gpu_count=1)
    first = agent_on(server, tmp_path, until=lambda agent: bool(server.samples[allocation_id]))
    run_until_killed(first)
    handle = first.allocations[allocation_id].handle
    os.killpg(handle.pid, signal.SIGKILL)  # what a reboot does to the job and its shim
    handle.popen.wait(timeout=5)

    run_until_killed(agent_on(server, tmp_path, until=reported(allocation_id, server)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "lost_on_restart"}


def test_a_crash_between_queuing_a_sample_and_saving_the_record_reuses_no_seq(server, tmp_path):
    allocation_id = server.assign(["sh", "-c", "sleep 1"], gpu_count=1)
    began = time.monotonic()
    first = agent_on(server, tmp_path, until=lambda agent: False)
    saves = []
    save = first._journal.save

    def save_then_die(allocation) -> None:
        saves.append(allocation.seq)
        if len(saves) > 3:
            raise Killed
        save(allocation)

    first._journal.save = save_then_die
    run_until_killed(first)
    assert len(first.reporter.outbox) == 1  # the last sample is queued, its record never written

    run_until_killed(agent_on(server, tmp_path, until=reported(allocation_id, server)))

    assert seqs(server, allocation_id) == list(range(1, len(seqs(server, allocation_id)) + 1))
    took_ms = int((time.monotonic() - began) * 1000) + 1
    assert 1000 <= gpu_ms(server, allocation_id) <= took_ms  # the re-sent sample is not counted twice


def test_a_job_being_stopped_when_the_agent_died_is_stopped_after_the_restart(server, tmp_path):
    allocation_id = server.assign(["sh", "-c", "trap '' TERM; echo ready; sleep 30"], gpu_count=1)
    output = tmp_path / "state" / "logs" / f"{allocation_id}.log"

    def stopping(agent: Agent) -> bool:
        # Cancelled only once the job says it ignores SIGTERM: a cancel sent before its trap is
        # in place would end it at once, and there would be nothing left to stop after the restart.
        if output.exists() and "ready" in output.read_text():
            server.to_cancel.add(allocation_id)
        return allocation_id in agent.allocations and agent.allocations[allocation_id].stop_reason == "cancelled"

    run_until_killed(agent_on(server, tmp_path, until=stopping))

    run_until_killed(agent_on(server, tmp_path, until=reported(allocation_id, server)))

    assert server.finished[allocation_id] == {"exit_code": 128 + signal.SIGKILL, "reason": "cancelled"}


def test_the_stop_drain_policy_stops_running_jobs_and_reports_them_drained(server, tmp_path):
    allocation_id = server.assign(["sleep", "30"], gpu_count=1)
    options = Options(usage_interval_s=0.2, tick_s=0.02, poll_wait_s=0, error_base_s=0.05, drain="stop")
    agent = agent_on(server, tmp_path, until=reported(allocation_id, server), options=options)
    began = time.monotonic()

    def drain_once_started(seconds: float) -> None:
        if server.started:
            agent.stop()
        time.sleep(seconds)

    agent._sleep = drain_once_started
    assert agent.run() == 0

    assert time.monotonic() - began < 25  # stopped: the job alone would have run 30 s
    assert server.finished[allocation_id] == {"exit_code": 128 + signal.SIGTERM, "reason": "drained"}


def test_the_jobs_output_is_shipped_before_its_finish(server, tmp_path):
    allocation_id = server.assign(["sh", "-c", "echo hello; sleep 0.3; printf 'wörld'"], gpu_count=1)

    run_until_killed(agent_on(server, tmp_path, until=reported(allocation_id, server)))

    assert server.log_text(allocation_id) == "hello\nwörld"
    # Usage reports may fall anywhere in between; what matters is that the output went first.
    calls = [path for _, path in server.calls if path.startswith(f"/allocations/{allocation_id}")]
    shipped = [path for path in calls if path.endswith(("/logs", "/finish"))]
    assert shipped[-1].endswith("/finish") and shipped[-2].endswith("/logs")


def test_log_shipping_stops_once_the_server_says_it_keeps_no_more(server, tmp_path):
    server.log_cap = 4
    allocation_id = server.assign(["sh", "-c", "echo 0123456789; sleep 0.5; echo more"], gpu_count=1)

    run_until_killed(agent_on(server, tmp_path, until=reported(allocation_id, server)))

    assert server.log_text(allocation_id) == "0123"
    assert sum(1 for _, path in server.calls if path.endswith("/logs")) == 1


class FakeRuntime:
    """Adopts whatever `outcome` says, so the journal's arithmetic can be checked exactly."""

    def __init__(self, outcome: Callable[[object], Adopted | None]) -> None:
        self.outcome = outcome

    def describe(self, handle) -> dict:
        return {"name": handle.spec.allocation_id}

    def adopt(self, spec, saved):
        return self.outcome(SimpleNamespace(spec=spec, log_path=None))


class TestJournal:
    ALLOCATION = "5f0c9a4e-1b2d-4c3e-8f6a-7b8c9d0e1f2a"
    GPUS = gpus.simulate("2xH100-80GB", "unit")

    def spec(self) -> JobSpec:
        return JobSpec(self.ALLOCATION, "job", "img", ("true",), tuple(g.uuid for g in self.GPUS))

    def journal_with_a_record(self, tmp_path: Path, runtime: FakeRuntime, **changes) -> Journal:
        spec = JobSpec(self.ALLOCATION, "job", "img", ("true",), tuple(g.uuid for g in self.GPUS))
        allocation = Allocation(spec, tuple(self.GPUS), None, accepted_at=0.0, seq=4, metered_ms=4000)
        allocation.handle = SimpleNamespace(spec=spec, log_path=None)
        allocation.sampled_at, allocation.log_offset = "2025-01-01T00:00:04.000Z", 10
        for name, value in changes.items():
            setattr(allocation, name, value)
        journal = Journal(tmp_path / "allocations", runtime)
        journal.save(allocation)
        return journal

    def test_a_running_job_meters_on_from_its_last_sample(self, tmp_path):
        journal = self.journal_with_a_record(tmp_path, FakeRuntime(lambda handle: Adopted(handle)))

        [found] = journal.recover(Outbox(), self.GPUS, now=100.0, wall_now="2025-01-01T00:00:10.000Z")

        assert found.exit_code is None
        assert found.allocation.samples(100.0, "later") == [{"seq": 5, "gpu_ms": 2 * 6000, "recorded_at": "later"}]
        assert found.allocation.log_offset == 10

    def test_the_record_keeps_the_jobs_variables_and_the_names_of_its_secrets_never_their_values(self, tmp_path):
        spec = dataclasses.replace(self.spec(), env={"EPOCHS": "3"}, secrets=("HF_TOKEN",))
        journal = self.journal_with_a_record(
            tmp_path, FakeRuntime(lambda handle: Adopted(handle)), spec=spec, secrets=Secrets({"HF_TOKEN": "hf_value"})
        )
        assert b"hf_value" not in (tmp_path / "allocations" / f"{self.ALLOCATION}.json").read_bytes()

        [found] = journal.recover(Outbox(), self.GPUS, now=100.0, wall_now="2025-01-01T00:00:10.000Z")

        assert found.allocation.spec == spec
        assert found.allocation.awaiting_secrets  # asked for again, to mask them in the job's log

    def test_a_job_that_ended_is_metered_only_until_it_ended(self, tmp_path):
        ended = datetime.fromisoformat("2025-01-01T00:00:05.500Z").timestamp()
        journal = self.journal_with_a_record(tmp_path, FakeRuntime(lambda h: Adopted(h, exit_code=3, exited_at=ended)))

        [found] = journal.recover(Outbox(), self.GPUS, now=100.0, wall_now="2025-01-01T01:00:00.000Z")

        assert found.exit_code == 3
        assert found.allocation.samples(100.0, "x")[0]["gpu_ms"] == 2 * 1500

    def test_a_job_gone_without_a_trace_comes_back_without_an_allocation(self, tmp_path):
        journal = self.journal_with_a_record(tmp_path, FakeRuntime(lambda handle: None))

        [found] = journal.recover(Outbox(), self.GPUS, now=100.0, wall_now="2025-01-01T00:00:10.000Z")

        assert found.allocation is None and found.allocation_id == self.ALLOCATION

    def test_reports_still_in_the_outbox_move_the_record_forward(self, tmp_path):
        journal = self.journal_with_a_record(tmp_path, FakeRuntime(lambda handle: Adopted(handle)))
        outbox = Outbox()
        outbox.add(Report("usage", self.ALLOCATION, {"seq": 5, "gpu_ms": 2000, "recorded_at": "2025-01-01T00:00:05Z"}))
        outbox.add(Report("logs", self.ALLOCATION, {"offset": 10, "end": 25, "data": "x" * 15}))

        [found] = journal.recover(outbox, self.GPUS, now=100.0, wall_now="2025-01-01T00:00:10.000Z")

        assert found.allocation.log_offset == 25
        assert found.allocation.samples(100.0, "x") == [{"seq": 6, "gpu_ms": 2 * 5000, "recorded_at": "x"}]

    def test_an_allocation_whose_finish_is_queued_is_forgotten(self, tmp_path):
        journal = self.journal_with_a_record(tmp_path, FakeRuntime(lambda handle: Adopted(handle)))
        outbox = Outbox()
        outbox.add(Report("finish", self.ALLOCATION, {"exit_code": 0, "reason": "exited"}))

        assert journal.recover(outbox, self.GPUS, now=100.0, wall_now="2025-01-01T00:00:10.000Z") == []
        assert not list((tmp_path / "allocations").iterdir())

    def test_an_unreadable_record_is_set_aside(self, tmp_path):
        journal = self.journal_with_a_record(tmp_path, FakeRuntime(lambda handle: Adopted(handle)))
        (tmp_path / "allocations" / f"{self.ALLOCATION}.json").write_text("{")

        assert journal.recover(Outbox(), self.GPUS, now=100.0, wall_now="2025-01-01T00:00:10.000Z") == []
        assert (tmp_path / "allocations" / f"{self.ALLOCATION}.bad").exists()

    def test_a_job_being_started_when_the_agent_died_is_found_by_its_allocation_and_metered_from_its_start(
        self, tmp_path
    ):
        """The record written before the runtime's start has no handle; the runtime finds the
        job by its allocation and says when it started: the time away counts from there."""
        started = datetime.fromisoformat("2025-01-01T00:00:07.000Z").timestamp()
        asked = []

        def find(handle):
            return Adopted(handle, started_at=started)

        runtime = FakeRuntime(find)
        runtime.adopt = lambda spec, saved: asked.append(saved) or find(SimpleNamespace(spec=spec, log_path=None))
        journal = Journal(tmp_path / "allocations", runtime)
        journal.save_starting(Allocation(self.spec(), tuple(self.GPUS), None, accepted_at=0.0))

        [found] = journal.recover(Outbox(), self.GPUS, now=100.0, wall_now="2025-01-01T00:00:10.000Z")

        assert asked[0] == {}  # no handle yet
        assert found.allocation.samples(100.0, "x") == [{"seq": 1, "gpu_ms": 2 * 3000, "recorded_at": "x"}]


def test_a_process_job_being_started_when_the_agent_died_is_reported_lost(tmp_path):
    """A process cannot be found without its pid: the record without a handle finds nothing."""
    from nodes.agent.runtime.process import ProcessRuntime

    assert ProcessRuntime(tmp_path / "work", tmp_path / "logs").adopt(TestJournal().spec(), {}) is None
