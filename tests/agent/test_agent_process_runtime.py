import dataclasses
import time
from pathlib import Path

import pytest

from nodes.agent.runtime import JobSpec, StartFailed
from nodes.agent.runtime.process import ProcessHandle, ProcessRuntime
from tests.agent.fakes import wait_exit

ALLOCATION = "5f0c9a4e-1b2d-4c3e-8f6a-7b8c9d0e1f2a"


@pytest.fixture
def runtime(tmp_path):
    return ProcessRuntime(tmp_path / "work", tmp_path / "state" / "logs", kill_grace_s=0.5)


def spec(*command: str) -> JobSpec:
    return JobSpec(
        allocation_id=ALLOCATION,
        job_id="job-1",
        image="ignored",
        command=command,
        gpu_uuids=("GPU-aaa", "GPU-bbb"),
    )


def wait_for_output(handle: ProcessHandle, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while not (text := handle.log_path.read_text()):
        assert time.monotonic() < deadline, "the job wrote nothing"
        time.sleep(0.02)
    return text


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_dead(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def test_a_job_runs_and_its_exit_code_comes_back(runtime):
    handle = runtime.start(spec("sh", "-c", "echo hello; exit 7"))

    assert wait_exit(runtime, handle) == 7
    assert handle.log_path.read_text() == "hello\n"


def test_a_job_sees_only_the_scrubbed_environment(runtime, monkeypatch):
    monkeypatch.setenv("SHEDSHARE_AGENT_CREDENTIAL", "shs_node_secret")
    handle = runtime.start(spec("sh", "-c", "env; echo cwd=$(pwd)"))
    wait_exit(runtime, handle)

    lines = set(handle.log_path.read_text().splitlines())
    env = dict(line.split("=", 1) for line in lines if "=" in line)

    assert "shs_node_secret" not in handle.log_path.read_text()
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaa,GPU-bbb"
    assert env["SHEDSHARE_ALLOCATION_ID"] == ALLOCATION
    assert env["SHEDSHARE_JOB_ID"] == "job-1"
    assert env["HOME"] == env["cwd"] == str(handle.workdir)
    assert set(env) - {"PWD", "SHLVL", "_", "cwd"} <= {
        "PATH", "HOME", "LANG", "CUDA_VISIBLE_DEVICES", "SHEDSHARE_JOB_ID",
        "SHEDSHARE_ALLOCATION_ID",
    }  # fmt: skip


def test_the_jobs_variables_and_secrets_reach_it_and_never_override_the_runtimes_own(runtime):
    job = dataclasses.replace(
        spec("sh", "-c", "env"),
        env={"EPOCHS": "3", "HOME": "/root", "PATH": "/opt", "SHEDSHARE_JOB_ID": "forged", "NVIDIA_DRIVER_X": "1"},
        secrets=("HF_TOKEN", "CUDA_VISIBLE_DEVICES", "EPOCHS"),
    )
    handle = runtime.start(job, {"HF_TOKEN": "hf_value", "CUDA_VISIBLE_DEVICES": "0", "EPOCHS": "4"})
    wait_exit(runtime, handle)

    env = dict(line.split("=", 1) for line in handle.log_path.read_text().splitlines() if "=" in line)

    assert env["HF_TOKEN"] == "hf_value"
    assert env["EPOCHS"] == "4"  # a secret of the same name wins over the plain variable
    assert env["HOME"] == str(handle.workdir)
    assert env["PATH"] != "/opt"
    assert env["SHEDSHARE_JOB_ID"] == "job-1"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaa,GPU-bbb"
    assert "NVIDIA_DRIVER_X" not in env


def test_the_shim_never_runs_with_the_renters_variables(runtime):
    """As root it would load whatever LD_PRELOAD names; only the job gets them."""
    job = dataclasses.replace(spec("sh", "-c", "echo $RENTERS; sleep 30"), env={"RENTERS": "choice"}, secrets=("KEY",))
    handle = runtime.start(job, {"KEY": "hf_value"})
    try:
        assert wait_for_output(handle) == "choice\n"

        shims_own = Path(f"/proc/{handle.pid}/environ").read_bytes()
        assert b"RENTERS" not in shims_own and b"hf_value" not in shims_own
    finally:
        runtime.kill(handle)
        wait_exit(runtime, handle)


def test_the_working_directory_is_removed_after_the_job_and_the_log_kept(runtime, tmp_path):
    handle = runtime.start(spec("sh", "-c", "echo data > scratch.bin"))
    wait_exit(runtime, handle)
    assert (handle.workdir / "scratch.bin").exists()

    runtime.cleanup(handle)

    assert not handle.workdir.exists()
    assert handle.log_path.exists()
    assert tmp_path / "work" not in handle.log_path.parents


def test_kill_stops_the_whole_process_group_including_a_grandchild(runtime):
    handle = runtime.start(spec("sh", "-c", "sleep 60 & echo $!; wait"))
    grandchild = int(wait_for_output(handle))

    runtime.kill(handle)

    assert wait_exit(runtime, handle) == 143
    assert wait_dead(grandchild)


def test_a_grandchild_that_ignores_sigterm_is_killed_anyway(runtime):
    handle = runtime.start(spec("sh", "-c", "(trap '' TERM; exec sleep 60) & echo $!; wait"))
    grandchild = int(wait_for_output(handle))

    runtime.kill(handle)
    wait_exit(runtime, handle)

    assert wait_dead(grandchild)


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period(runtime):
    handle = runtime.start(spec("sh", "-c", "trap '' TERM; echo ready; sleep 60"))
    wait_for_output(handle)
    began = time.monotonic()

    runtime.kill(handle)

    assert wait_exit(runtime, handle) == 137
    assert 0.5 <= time.monotonic() - began < 5


def test_cleanup_kills_what_a_finished_job_left_running(runtime):
    handle = runtime.start(spec("sh", "-c", "sleep 60 & echo $!"))
    grandchild = int(wait_for_output(handle))
    assert wait_exit(runtime, handle) == 0

    runtime.cleanup(handle)

    assert wait_dead(grandchild)


@pytest.mark.parametrize(
    ("job", "complaint"),
    [
        (spec("/nonexistent/trainer"), "cannot run '/nonexistent/trainer'"),
        (spec(), "empty command"),
        (JobSpec("../escape", "job", "", ("true",), ()), "unsafe allocation id"),
    ],
)
def test_a_job_that_cannot_start_raises_start_failed(runtime, tmp_path, job, complaint):
    with pytest.raises(StartFailed, match=complaint):
        runtime.start(job)

    assert not (tmp_path / "work" / ALLOCATION).exists()


def test_an_unusable_work_dir_is_a_start_failure(tmp_path):
    (tmp_path / "file").write_text("")
    runtime = ProcessRuntime(tmp_path / "file" / "work", tmp_path / "logs")

    with pytest.raises(StartFailed):
        runtime.start(spec("true"))


def test_a_jobs_port_is_reached_only_while_the_job_itself_listens_there(runtime):
    import socket
    import sys

    listen = (
        "import socket, time; s = socket.create_server(('127.0.0.2', 0)); "
        "print(s.getsockname()[1], flush=True); time.sleep(60)"
    )
    handle = runtime.start(spec(sys.executable, "-c", listen))
    other = socket.create_server(("127.0.0.1", 0))  # the host's, not the job's
    try:
        port = int(wait_for_output(handle).split()[0])
        # Where the job listens: not the host's 127.0.0.1, where another service may have the port.
        assert runtime.port_address(handle, port) == ("127.0.0.2", port)
        with pytest.raises(StartFailed, match="does not listen"):
            runtime.port_address(handle, other.getsockname()[1])
    finally:
        other.close()
        runtime.kill(handle)
        wait_exit(runtime, handle)
        runtime.cleanup(handle)


@pytest.mark.parametrize(
    ("written", "address"),
    [
        ("0100007F", "127.0.0.1"),
        ("00000000", "127.0.0.1"),  # every address: reached on loopback
        ("0200007F", "127.0.0.2"),
        ("00000000000000000000000001000000", "::1"),
        ("00000000000000000000000000000000", "::1"),
        ("0000000000000000FFFF00000200007F", "127.0.0.2"),  # IPv4-mapped
    ],
)
def test_proc_addresses_are_read_as_linux_writes_them(written, address):
    from nodes.agent.runtime.process import _proc_address

    assert _proc_address(written) == address
