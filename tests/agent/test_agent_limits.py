"""Backyard limits, end to end in the agent loop: they change what the heartbeat advertises, a job
sent anyway is refused before anything starts, and quiet hours cap the GPUs' power."""

import time
from pathlib import Path

from nodes.agent import gpus
from nodes.agent.client import AgentClient
from nodes.agent.loop import Agent, Options
from nodes.agent.runtime.process import ProcessRuntime
from tests.agent.fakes import CREDENTIAL, HONOURS_ALL, UNIT_ID, FakeServer

FAST = Options(usage_interval_s=0.2, max_jobs=1, tick_s=0.02, poll_wait_s=0, error_base_s=0.05)
ALL_DAY = {"start": "00:00", "end": "23:59", "time_zone": "UTC"}


def run_agent(server: FakeServer, tmp_path: Path, inventory: gpus.Inventory, *, seconds: float = 20) -> Agent:
    client = AgentClient("http://shed.test", CREDENTIAL, transport=server.transport())
    runtime = ProcessRuntime(tmp_path / "work", tmp_path / "logs", kill_grace_s=1.0)
    deadline = time.monotonic() + seconds

    def sleep(pause: float) -> None:
        assert time.monotonic() < deadline, "the agent loop did not finish in time"
        time.sleep(pause)

    agent = Agent(client, runtime, server.inventory, FAST, sleep=sleep, policy=HONOURS_ALL, inventory=inventory)
    agent.run()
    return agent


def shed(**device_changes) -> tuple[gpus.Inventory, list]:
    inventory = gpus.simulated_inventory("4xH100-80GB", UNIT_ID)
    devices = inventory._nvml.devices
    for device in devices:
        for name, value in device_changes.items():
            setattr(device, name, value)
    return inventory, devices


def beats_after_policy(server: FakeServer) -> list[dict]:
    return [beat for beat in server.heartbeats if "limits" in beat][1:]  # the first one predates the policy


def test_without_limits_the_heartbeat_advertises_every_free_gpu(server, tmp_path):
    inventory, _ = shed()
    allocation_id = server.assign(["sleep", "0.3"], gpu_count=1)

    run_agent(server, tmp_path, inventory)

    assert server.finished[allocation_id]["reason"] == "exited"
    first = server.heartbeats[0]
    assert len(first["advertise"]) == 4 and first["limits"]["in_force"] == []


def test_quiet_hours_advertise_only_what_they_allow(server, tmp_path):
    server.policy = {"quiet_hours": {**ALL_DAY, "max_gpus": 0}}
    server.heartbeat_interval_s = 0.05
    inventory, _ = shed()
    server.assign(["true"], gpu_count=1)
    original = server._heartbeat_reply

    def reply():
        if len(server.heartbeats) == 6:
            server.policy = {}  # the quiet hours end
        return original()

    server._heartbeat_reply = reply
    run_agent(server, tmp_path, inventory)

    quiet = beats_after_policy(server)[:4]
    assert quiet and all(beat["advertise"] == [] for beat in quiet)
    assert quiet[-1]["limits"] == {"in_force": ["quiet_hours"], "advertised_gpus": 0, "gpus": 4}
    assert len(server.started) == 1  # taken once the quiet hours were over


def test_a_job_on_gpus_the_limits_have_closed_is_refused_before_anything_starts(server, tmp_path):
    # Quiet hours leave one GPU open; a server with a stale view sends a two-GPU job.
    server.policy = {"quiet_hours": {**ALL_DAY, "max_gpus": 1}}
    server.heartbeat_interval_s = 0.05
    inventory, _ = shed()
    marker = tmp_path / "ran"
    sent: list[str] = []
    original = server._heartbeat_reply

    def reply():
        if len(server.heartbeats) == 3 and not sent:
            sent.append(server.assign(["touch", str(marker)], gpu_count=2))
        return original()

    server._heartbeat_reply = reply
    run_agent(server, tmp_path, inventory)

    assert sent and server.finished[sent[0]] == {"exit_code": None, "reason": "refused:limits"}
    assert server.started == []
    assert not marker.exists()


def test_a_hot_shed_takes_no_new_work_until_it_has_cooled_below_the_resume_threshold(server, tmp_path):
    server.policy = {"thermal_stop_c": 80, "thermal_resume_c": 70}
    inventory, devices = shed(temperature_c=85)
    allocation_id = server.assign(["true"], gpu_count=1)
    server.heartbeat_interval_s = 0.05
    original = server._heartbeat_reply

    def reply():
        if len(server.heartbeats) == 6:
            for device in devices:
                device.temperature_c = 75  # cooler, but not yet below the resume threshold
        if len(server.heartbeats) == 10:
            for device in devices:
                device.temperature_c = 65
        return original()

    server._heartbeat_reply = reply
    run_agent(server, tmp_path, inventory)

    held = server.heartbeats[1:10]
    assert held and all(beat["limits"]["in_force"] == ["thermal"] and beat["advertise"] == [] for beat in held)
    assert server.finished[allocation_id]["reason"] == "exited"  # taken once it had cooled down
    assert server.started == [allocation_id]


def test_quiet_hours_cap_gpu_power_and_the_cap_is_lifted_when_they_end(server, tmp_path):
    server.policy = {"quiet_hours": {**ALL_DAY, "max_gpus": 4, "power_cap_w": 300}}
    inventory, devices = shed()
    server.assign(["sleep", "1"], gpu_count=1)
    server.heartbeat_interval_s = 0.05
    caps: list[int] = []
    original = server._heartbeat_reply

    def reply():
        caps.append(devices[0].power_limit_mw)
        if len(server.heartbeats) == 3:
            server.policy = {}
        return original()

    server._heartbeat_reply = reply
    run_agent(server, tmp_path, inventory)

    assert 300_000 in caps
    assert devices[0].power_limit_mw == devices[0].default_power_limit_mw == 700_000
    assert inventory.power_cap_w is None


def test_the_power_budget_limits_how_many_gpus_take_new_work(server, tmp_path):
    # Four idle GPUs draw 4 x 71 W; each new job may add up to 629 W: a 1.6 kW budget fits two.
    server.policy = {"power_budget_w": 1600}
    inventory, _ = shed()
    server.assign(["sleep", "0.6"], gpu_count=1)
    server.heartbeat_interval_s = 0.05

    run_agent(server, tmp_path, inventory)

    later = beats_after_policy(server)
    assert later and all("power_budget" in beat["limits"]["in_force"] for beat in later)
    assert all(len(beat["advertise"]) <= 2 for beat in later)
