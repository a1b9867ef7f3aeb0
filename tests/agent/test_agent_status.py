import json
import os
import subprocess
import sys
import time

from click.testing import CliRunner

from nodes.agent import gpus, status
from nodes.agent.cli import main
from nodes.agent.client import AgentClient
from nodes.agent.heartbeat import Heartbeater
from nodes.agent.loop import Agent, Options
from nodes.agent.runtime.process import ProcessRuntime
from nodes.agent.status import StatusWriter
from tests.agent.fakes import CREDENTIAL, HONOURS_ALL, UNIT_ID, FakeServer

FAST = Options(usage_interval_s=0.2, max_jobs=1, tick_s=0.02, poll_wait_s=0, error_base_s=0.05)


def run_agent_watching_status(server: FakeServer, tmp_path) -> list[dict]:
    """Run the agent until its one job is done; return every status file content it wrote."""
    client = AgentClient("http://shed.test", CREDENTIAL, transport=server.transport())
    runtime = ProcessRuntime(tmp_path / "work", tmp_path / "logs", kill_grace_s=1.0)
    path = tmp_path / "status.json"
    seen: list[dict] = []
    deadline = time.monotonic() + 20

    def sleep(seconds: float) -> None:
        assert time.monotonic() < deadline, "the agent loop did not finish in time"
        if path.exists() and (not seen or seen[-1] != status.read(tmp_path)):
            seen.append(status.read(tmp_path))
        time.sleep(seconds)

    agent = Agent(client, runtime, server.inventory, FAST, sleep=sleep, policy=HONOURS_ALL, status_path=path)
    agent.run()
    return seen


def test_the_running_agent_keeps_a_private_status_file_with_its_jobs_heartbeat_and_limits(server, tmp_path):
    allocation_id = server.assign(["sleep", "0.5"], gpu_count=2)
    job_id = server.queue[-1]["job"]["id"]
    server.policy = {"quiet_hours": {"start": "00:00", "end": "23:59", "time_zone": "UTC", "max_gpus": 4}}

    seen = run_agent_watching_status(server, tmp_path)

    running = next(
        s for s in seen if s["allocations"] and s["allocations"][0]["state"] == "running" and s["limits"]["in_force"]
    )
    assert running["pid"] == os.getpid()
    assert running["allocations"] == [
        {
            "id": allocation_id,
            "job_id": job_id,
            "gpus": [0, 1],
            "state": "running",
            "started_at": running["allocations"][0]["started_at"],
        }
    ]
    assert running["allocations"][0]["started_at"].endswith("Z")
    assert running["last_heartbeat_ok_at"] is not None and running["last_heartbeat_error"] is None
    assert running["server_status"] == "online"
    assert running["limits"]["in_force"] == ["quiet_hours"]
    assert running["limits"]["gpus"] == 4
    assert [gpu["uuid"] for gpu in running["gpus"]] == [gpu.uuid for gpu in server.inventory]
    assert seen[-1]["allocations"] == []
    assert (tmp_path / "status.json").stat().st_mode & 0o777 == 0o600


def test_a_failed_heartbeat_shows_with_the_time_of_the_last_success(server, tmp_path):
    now = [1000.0]
    client = AgentClient("http://shed.test", CREDENTIAL, transport=server.transport())
    heartbeater = Heartbeater(client, server.inventory, clock=lambda: now[0])
    writer = StatusWriter(tmp_path / "status.json", server.inventory, now=lambda: 1_750_000_000.0 + now[0])

    heartbeater.beat_if_due([])
    writer.update(heartbeater, [], {})
    ok_at = status.read(tmp_path)["last_heartbeat_ok_at"]
    server.failures["/heartbeat"] = 1
    now[0] += 60
    heartbeater.beat_if_due([])
    writer.update(heartbeater, [], {})

    data = status.read(tmp_path)
    assert data["last_heartbeat_ok_at"] == ok_at
    assert data["last_heartbeat_at"] != ok_at
    assert data["last_heartbeat_error"] == "POST /heartbeat: ConnectError: connection refused"


def write_status(tmp_path, **fields) -> None:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    now = int(time.time())  # whole seconds, as the file keeps them
    data = {
        "pid": os.getpid(),
        "started_at": status.iso(now - 3700),
        "updated_at": status.iso(now),
        "last_heartbeat_at": status.iso(now - 4),
        "last_heartbeat_ok_at": status.iso(now - 4),
        "last_heartbeat_error": None,
        "server_status": "online",
        "connection": "stream connected",
        "allocations": [
            {
                "id": "a-1",
                "job_id": "j-1",
                "gpus": [0, 1],
                "state": "running",
                "started_at": status.iso(now - 65),
            }
        ],
        "limits": {},
        "gpus": [gpu.as_report() for gpu in gpus.simulate("2xH100-80GB", UNIT_ID)],
    }
    (state / "status.json").write_text(json.dumps(data | fields))


def status_cli(tmp_path, *args: str):
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps({"url": "http://x", "unit_id": UNIT_ID, "credential": "c", "state_dir": str(tmp_path / "state")})
    )
    return CliRunner().invoke(main, ["status", "--config", str(config), *args])


def test_status_shows_what_runs_the_limits_and_the_last_heartbeat(tmp_path):
    write_status(tmp_path)

    result = status_cli(tmp_path)

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"Agent pid {os.getpid()}: running; started ")
    assert lines[0].endswith("(1 h 1 min ago)")
    assert lines[1].startswith("Last heartbeat: ok, last success ")
    assert lines[1].endswith("(4 s ago); server says the unit is online")
    assert lines[2] == "Connection: stream connected"
    assert lines[3] == "Limits in force: none"
    assert lines[6].split() == ["ALLOCATION", "JOB", "GPUS", "STATE", "STARTED"]
    assert lines[7].split() == ["a-1", "j-1", "0,1", "running", "1", "min", "5", "s", "ago"]
    assert "GPUs (as discovered at start-up):" in result.output
    assert result.output.count("H100") == 2


def test_status_shows_a_failing_heartbeat_and_limits(tmp_path):
    write_status(tmp_path, last_heartbeat_error="POST /heartbeat: ConnectError", limits={"power_budget_kw": 3.5})

    result = status_cli(tmp_path)

    assert "Last heartbeat: FAILED 4 s ago: POST /heartbeat: ConnectError; last success" in result.output
    assert "Limits in force: power_budget_kw=3.5" in result.output


def test_status_json_adds_whether_the_agent_runs(tmp_path):
    write_status(tmp_path)

    result = status_cli(tmp_path, "--json")

    data = json.loads(result.output)
    assert data["running"] is True
    assert data["allocations"][0]["id"] == "a-1"


def test_status_of_an_agent_that_is_gone_says_so_and_exits_1(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_status(tmp_path, pid=int(gone.stdout))

    result = status_cli(tmp_path)

    assert result.exit_code == 1
    assert "NOT running (this is its status of " in result.output.splitlines()[0]


def test_status_without_a_status_file_explains_and_exits_1(tmp_path):
    result = status_cli(tmp_path)

    assert result.exit_code == 1
    assert "no agent status in" in result.output
    assert "Traceback" not in result.output
