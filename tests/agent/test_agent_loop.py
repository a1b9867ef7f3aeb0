import logging
import time
from pathlib import Path

import pytest

from nodes.agent.client import AgentClient
from nodes.agent.loop import Agent, Options
from nodes.agent.runtime.process import ProcessRuntime
from tests.agent.fakes import CREDENTIAL, HONOURS_ALL, FakeServer

FAST = Options(usage_interval_s=0.2, max_jobs=1, tick_s=0.02, poll_wait_s=0, error_base_s=0.05)


def make_agent(server: FakeServer, tmp_path: Path, options: Options = FAST, on_tick=None) -> Agent:
    client = AgentClient("http://shed.test", CREDENTIAL, transport=server.transport())
    runtime = ProcessRuntime(tmp_path / "work", tmp_path / "logs", kill_grace_s=1.0)
    deadline = time.monotonic() + 90  # a guard against a hung loop, far above any test's need

    def sleep(seconds: float) -> None:
        if time.monotonic() > deadline:
            raise AssertionError("the agent loop did not finish in time")
        if on_tick:
            on_tick(agent)
        time.sleep(seconds)

    agent = Agent(client, runtime, server.inventory, options, sleep=sleep, policy=HONOURS_ALL)
    return agent


def seqs(server: FakeServer, allocation_id: str) -> list[int]:
    return sorted(server.samples[allocation_id])


def gpu_ms(server: FakeServer, allocation_id: str) -> int:
    return sum(s["gpu_ms"] for s in server.samples[allocation_id].values())


def timed_run(agent: Agent) -> tuple[int, int]:
    """Run the agent to the end; returns (exit status, milliseconds it took). Usage is bounded by
    the time that really passed, whatever the machine's load, never by a guess of it."""
    began = time.monotonic()
    status = agent.run()
    return status, int((time.monotonic() - began) * 1000) + 1


def test_the_agent_runs_an_assignment_and_reports_usage_then_its_exit_code(server, tmp_path):
    allocation_id = server.assign(["sh", "-c", "sleep 1; exit 3"], gpu_count=2)

    status, took_ms = timed_run(make_agent(server, tmp_path))

    assert status == 0
    assert server.started == [allocation_id]
    # The process runtime runs no image (no digest), and says that the job is a plain process.
    assert server.start_bodies[allocation_id] == {"runs_in": "process"}
    assert server.finished[allocation_id] == {"exit_code": 3, "reason": "exited"}
    assert seqs(server, allocation_id) == list(range(1, len(seqs(server, allocation_id)) + 1))
    assert len(seqs(server, allocation_id)) >= 4
    assert 2 * 950 <= gpu_ms(server, allocation_id) <= 2 * took_ms
    assert server.calls[-1] == ("POST", f"/allocations/{allocation_id}/finish")
    assert any(allocation_id in beat["running"] for beat in server.heartbeats)
    assert {beat["country"] for beat in server.heartbeats} == {"DE"}  # the country the agent checks against
    assert not (tmp_path / "work" / allocation_id).exists()


def test_a_cancel_from_the_heartbeat_kills_the_job_and_reports_cancelled(server, tmp_path, caplog):
    server.cancel_once_started = True
    allocation_id = server.assign(["sleep", "30"], gpu_count=1)
    began = time.monotonic()

    with caplog.at_level(logging.INFO, logger="nodes.agent.loop"):
        make_agent(server, tmp_path).run()

    assert time.monotonic() - began < 25  # stopped: the job alone would have run 30 s
    assert server.finished[allocation_id] == {"exit_code": 143, "reason": "cancelled"}
    assert seqs(server, allocation_id)
    assert server.calls[-1] == ("POST", f"/allocations/{allocation_id}/finish")
    # As from a server that predates preemption: no answer carried the key, nothing was preempted.
    assert any(allocation_id in reply["cancel"] for reply in server.replies)
    assert not any("preempt" in reply for reply in server.replies)
    assert "event=job_preempted" not in caplog.text


def test_a_preemption_notice_sends_sigterm_to_checkpoint_and_reports_preempted(server, tmp_path, caplog):
    checkpoint, ready = tmp_path / "checkpoint", tmp_path / "ready"
    # The notice comes once the job has set its trap: before that, SIGTERM would just end it.
    server.preempt_when = ready.exists
    script = f"trap 'echo saved > {checkpoint}; exit 0' TERM; touch {ready}; sleep 30 & wait"
    allocation_id = server.assign(["sh", "-c", script], gpu_count=1)
    began = time.monotonic()

    with caplog.at_level(logging.INFO, logger="nodes.agent.loop"):
        make_agent(server, tmp_path).run()

    assert time.monotonic() - began < 25  # stopped: the job alone would have run 30 s
    assert any(reply.get("preempt") == [allocation_id] and not reply["cancel"] for reply in server.replies)
    assert checkpoint.read_text() == "saved\n"  # the job had its notice and checkpointed
    assert server.finished[allocation_id] == {"exit_code": 0, "reason": "preempted"}
    assert server.calls[-1] == ("POST", f"/allocations/{allocation_id}/finish")
    assert caplog.text.count("event=job_preempted") == 1
    assert f"event=job_preempted allocation={allocation_id}" in caplog.text


def test_an_allocation_both_cancelled_and_preempted_is_reported_preempted(server, tmp_path, caplog):
    server.cancel_once_started = True
    server.preempt_once_started = True
    allocation_id = server.assign(["sleep", "30"], gpu_count=1)

    with caplog.at_level(logging.INFO, logger="nodes.agent.loop"):
        make_agent(server, tmp_path).run()

    assert any(
        reply["cancel"] == [allocation_id] and reply.get("preempt") == [allocation_id] for reply in server.replies
    )
    assert server.finished[allocation_id] == {"exit_code": 143, "reason": "preempted"}
    assert "event=job_preempted" in caplog.text


def test_a_job_past_its_max_duration_is_killed_and_reported_as_timeout(server, tmp_path):
    allocation_id = server.assign(["sleep", "30"], gpu_count=1, max_duration_s=1)

    _, took_ms = timed_run(make_agent(server, tmp_path))

    assert server.finished[allocation_id] == {"exit_code": 143, "reason": "timeout"}
    assert 950 <= gpu_ms(server, allocation_id) <= took_ms < 25_000  # stopped long before its own end


def test_a_start_refused_with_409_never_runs_the_job(server, tmp_path):
    server.refuse_start = True
    marker = tmp_path / "ran"
    allocation_id = server.assign(["touch", str(marker)])

    make_agent(server, tmp_path).run()

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "start_failed"}
    assert not server.samples[allocation_id]
    assert not marker.exists()


def test_a_start_the_server_never_confirms_is_given_up_as_unconfirmed_without_running(server, tmp_path):
    """An outage longer than start_give_up_s: the job never ran, and the finish says why, so the
    server queues it again instead of failing it."""
    server.failures["/start"] = 10**6  # the server cannot be reached for the start, and only it
    marker = tmp_path / "ran"
    allocation_id = server.assign(["touch", str(marker)])
    options = Options(usage_interval_s=0.2, max_jobs=1, tick_s=0.02, poll_wait_s=0, error_base_s=0.05,
                      start_give_up_s=0.5)  # fmt: skip

    make_agent(server, tmp_path, options).run()

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "start_unconfirmed"}
    assert not marker.exists()


def test_a_command_that_cannot_run_is_reported_as_start_failed(server, tmp_path):
    allocation_id = server.assign(["/nonexistent/trainer"])

    make_agent(server, tmp_path).run()

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "start_failed"}


def test_reports_survive_network_errors_and_arrive_in_order(server, tmp_path):
    server.failures["/heartbeat"] = 2
    server.failures["/usage"] = 3
    server.failures["/finish"] = 2
    allocation_id = server.assign(["sh", "-c", "sleep 0.6"], gpu_count=4)

    status, took_ms = timed_run(make_agent(server, tmp_path))

    assert status == 0
    assert server.finished[allocation_id] == {"exit_code": 0, "reason": "exited"}
    assert seqs(server, allocation_id) == list(range(1, len(seqs(server, allocation_id)) + 1))
    assert 4 * 550 <= gpu_ms(server, allocation_id) <= 4 * took_ms


def test_stopping_drains_the_running_job_and_takes_no_more_work(server, tmp_path):
    first = server.assign(["sh", "-c", "sleep 0.5"], gpu_count=1)
    server.assign(["true"], gpu_count=1)

    def stop_once_started(agent: Agent) -> None:
        if server.started:
            agent.stop()

    options = Options(usage_interval_s=0.2, tick_s=0.02, poll_wait_s=0, error_base_s=0.05)
    assert make_agent(server, tmp_path, options, on_tick=stop_once_started).run() == 0

    assert server.started == [first]
    assert server.finished[first] == {"exit_code": 0, "reason": "exited"}
    assert len(server.queue) == 1


def test_a_forced_stop_kills_running_jobs(server, tmp_path):
    allocation_id = server.assign(["sleep", "30"], gpu_count=1)

    def force_stop(agent: Agent) -> None:
        if server.started:
            agent.stop(force=True)

    make_agent(server, tmp_path, on_tick=force_stop).run()

    assert server.finished[allocation_id] == {"exit_code": 143, "reason": "agent_stopped"}


@pytest.mark.parametrize(("gpu_count", "pulls_expected"), [(1, True), (4, False)])
def test_the_agent_pulls_only_while_it_has_free_gpus(server, tmp_path, gpu_count, pulls_expected):
    allocation_id = server.assign(["sh", "-c", "sleep 0.5"], gpu_count=gpu_count)

    def stop_when_finished(agent: Agent) -> None:
        if server.finished:
            agent.stop()

    options = Options(usage_interval_s=1, tick_s=0.02, poll_wait_s=0)
    make_agent(server, tmp_path, options, on_tick=stop_when_finished).run()

    start = server.calls.index(("POST", f"/allocations/{allocation_id}/start"))
    end = server.calls.index(("POST", f"/allocations/{allocation_id}/finish"))
    pulls = [call for call in server.calls[start:end] if call[1] == "/assignments/next"]
    assert bool(pulls) is pulls_expected


def test_heartbeats_keep_claiming_a_finished_job_until_its_reports_are_delivered(server, tmp_path):
    """Otherwise the server would take a job whose finish is still on its way for lost."""
    allocation_id = server.assign(["true"], gpu_count=1)
    server.failures["/usage"] = 4
    in_flight_claims = []
    reply = server._heartbeat_reply

    def recording_reply():
        if allocation_id in server.started and allocation_id not in server.finished:
            in_flight_claims.append(allocation_id in server.heartbeats[-1]["running"])
        return reply()

    server._heartbeat_reply = recording_reply

    make_agent(server, tmp_path).run()

    assert server.finished[allocation_id] == {"exit_code": 0, "reason": "exited"}
    assert len(in_flight_claims) >= 2
    assert all(in_flight_claims)


@pytest.mark.parametrize("interruptible", [True, False])
def test_a_gpu_held_by_an_interruptible_job_stays_advertised_for_an_on_demand_one(server, tmp_path, interruptible):
    """Placement stops an interruptible job for an on-demand one only on GPUs the unit
    advertises: while the job runs, its GPU stays advertised if (and only if) it may be stopped."""
    release = tmp_path / "release"
    server.assign(
        ["sh", "-c", f"while [ ! -e {release} ]; do sleep 0.05; done"], gpu_count=1, interruptible=interruptible
    )
    held, idle = server.inventory[0].uuid, {gpu.uuid for gpu in server.inventory[1:]}
    seen = []

    def watch(agent):
        # The job runs until three heartbeats have gone out since it started.
        if any(a.handle is not None for a in agent.allocations.values()):
            seen.append(len(server.heartbeats))
            if seen[-1] - seen[0] >= 3:
                release.touch()

    status = make_agent(server, tmp_path, FAST, on_tick=watch).run()

    assert status == 0 and seen
    during = [beat["advertise"] for beat in server.heartbeats[seen[0] + 1 : seen[-1]] if "advertise" in beat]
    assert during, "no heartbeat while the job ran"
    for advertised in during:
        assert set(advertised) == (idle | {held} if interruptible else idle)
