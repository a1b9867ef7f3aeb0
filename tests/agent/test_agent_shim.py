import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from nodes.agent.runtime import JobSpec
from nodes.agent.runtime.process import SHIM, ProcessRuntime
from tests.agent.fakes import wait_exit

ALLOCATION = "5f0c9a4e-1b2d-4c3e-8f6a-7b8c9d0e1f2a"


def shim(exit_file, *command: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The shim running `command`, with `env` (by default only PATH) given as the job's environment."""
    argv = [sys.executable, "-I", str(SHIM), str(exit_file), "--", *command]
    process = subprocess.Popen(
        argv, start_new_session=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    with suppress(BrokenPipeError), process.stdin:  # a shim that refuses its arguments reads nothing
        process.stdin.write(json.dumps(env or {"PATH": os.environ["PATH"]}).encode())
    return process


def recorded(exit_file) -> dict:
    return json.loads(exit_file.read_text())


def test_the_shim_records_the_jobs_exit_code_and_when_it_ended(tmp_path):
    exit_file = tmp_path / "job.exit"
    began = time.time()

    assert shim(exit_file, "sh", "-c", "exit 7").wait(timeout=10) == 7

    assert recorded(exit_file)["exit_code"] == 7
    assert began <= recorded(exit_file)["exited_at"] <= time.time()
    assert oct(exit_file.stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_job_killed_by_a_signal_is_recorded_as_128_plus_the_signal(tmp_path):
    exit_file = tmp_path / "job.exit"

    shim(exit_file, "sh", "-c", "kill -KILL $$").wait(timeout=10)

    assert recorded(exit_file)["exit_code"] == 128 + signal.SIGKILL


def test_sigterm_to_the_group_stops_the_job_but_not_the_shim_which_records_it(tmp_path):
    exit_file = tmp_path / "job.exit"
    process = shim(exit_file, "sh", "-c", "echo ready; sleep 30")
    assert process.stdout.readline() == b"ready\n"

    os.killpg(process.pid, signal.SIGTERM)

    assert process.wait(timeout=10) == 128 + signal.SIGTERM
    assert recorded(exit_file)["exit_code"] == 128 + signal.SIGTERM


def test_a_command_that_cannot_run_is_recorded_as_127(tmp_path):
    exit_file = tmp_path / "job.exit"
    process = shim(exit_file, "/nonexistent/trainer")

    assert process.wait(timeout=10) == 127
    assert b"cannot run '/nonexistent/trainer'" in process.stdout.read()
    assert recorded(exit_file)["exit_code"] == 127


def test_the_job_gets_the_environment_from_stdin_and_the_shim_keeps_its_own(tmp_path):
    """As root the shim must not run with what the renter chose: LD_PRELOAD would load into it."""
    exit_file = tmp_path / "job.exit"
    env = {"PATH": os.environ["PATH"], "RENTERS_CHOICE": "yes"}
    process = shim(exit_file, "sh", "-c", "echo $RENTERS_CHOICE; sleep 30", env=env)
    try:
        assert process.stdout.readline() == b"yes\n"

        assert b"RENTERS_CHOICE" not in Path(f"/proc/{process.pid}/environ").read_bytes()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def test_a_shim_without_a_command_explains_its_usage(tmp_path):
    process = shim(tmp_path / "job.exit")

    assert process.wait(timeout=10) == 2
    assert b"usage:" in process.stdout.read()


@pytest.fixture
def runtime(tmp_path):
    return ProcessRuntime(tmp_path / "work", tmp_path / "logs", kill_grace_s=0.5)


def spec(*command: str) -> JobSpec:
    return JobSpec(ALLOCATION, "job-1", "ignored", command, ("GPU-aaa",))


class TestAdoption:
    """A restarted agent has a new runtime that never started the job: it adopts it from what
    `describe` saved."""

    def test_a_running_job_is_adopted_then_its_exit_code_read_from_the_file(self, tmp_path, runtime):
        handle = runtime.start(spec("sh", "-c", "sleep 0.5; exit 4"))
        saved = json.loads(json.dumps(runtime.describe(handle)))

        adopted = ProcessRuntime(tmp_path / "work", tmp_path / "logs").adopt(handle.spec, saved)

        assert adopted is not None and adopted.exit_code is None
        assert adopted.handle.popen is None
        assert wait_exit(runtime, adopted.handle) == 4
        assert adopted.handle.log_path == handle.log_path

    def test_an_adopted_job_can_still_be_stopped(self, tmp_path, runtime):
        handle = runtime.start(spec("sh", "-c", "echo ready; sleep 30"))
        deadline = time.monotonic() + 10
        while handle.log_path.read_text() != "ready\n":
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.02)
        adopted = ProcessRuntime(tmp_path / "work", tmp_path / "logs").adopt(handle.spec, runtime.describe(handle))
        assert adopted is not None

        runtime.kill(adopted.handle)

        assert wait_exit(runtime, adopted.handle) == 128 + signal.SIGTERM

    def test_a_job_that_ended_while_the_agent_was_away_comes_back_with_its_code_and_end(self, tmp_path, runtime):
        handle = runtime.start(spec("sh", "-c", "exit 3"))
        wait_exit(runtime, handle)

        adopted = ProcessRuntime(tmp_path / "work", tmp_path / "logs").adopt(handle.spec, runtime.describe(handle))

        assert adopted is not None
        assert adopted.exit_code == 3
        assert adopted.exited_at == pytest.approx(time.time(), abs=5)

    @pytest.mark.parametrize(
        "change", [{"boot_id": "another-boot"}, {"started": "1"}], ids=["after a reboot", "a reused pid"]
    )
    def test_a_job_gone_without_a_trace_is_none(self, tmp_path, runtime, change):
        handle = runtime.start(spec("sleep", "30"))
        saved = runtime.describe(handle) | change
        try:
            handle.exit_path.unlink(missing_ok=True)

            assert ProcessRuntime(tmp_path / "work", tmp_path / "logs").adopt(handle.spec, saved) is None
        finally:
            runtime.kill(handle)
            runtime.cleanup(handle)

    def test_cleanup_removes_the_exit_file(self, runtime):
        handle = runtime.start(spec("true"))
        wait_exit(runtime, handle)
        assert handle.exit_path.exists()

        runtime.cleanup(handle)

        assert not handle.exit_path.exists()
