"""A real Docker engine for the tests that need one (`docker/engine.sh up` provides it).

Where no engine answers the tests skip, saying why; with SHEDSHARE_REQUIRE_ENGINE=1 (CI) they fail
instead, so a broken engine can never pass as a skip.
"""

import os
import time
from pathlib import Path
from typing import Any

import pytest

from nodes.agent.isolation import IsolationConfig
from nodes.agent.runtime import JobSpec, RuntimeUnavailable
from nodes.agent.runtime.docker import DockerHandle, DockerRuntime, connect, host_of

SANDBOX = "runsc"
RUNTIMES = ("runc", SANDBOX)


def unavailable(why: str) -> None:
    if os.environ.get("SHEDSHARE_REQUIRE_ENGINE") == "1":
        pytest.fail(f"{why} (SHEDSHARE_REQUIRE_ENGINE=1: run `bash docker/engine.sh up` first)")
    pytest.skip(why)


def client() -> Any:
    try:
        return connect()
    except RuntimeUnavailable as exc:
        unavailable(str(exc))


def image() -> str:
    name = os.environ.get("SHEDSHARE_TEST_IMAGE", "")
    if not name:
        unavailable("SHEDSHARE_TEST_IMAGE is not set (docker/engine.sh up pushes one to a local registry)")
    return name


def require_runtime(engine: Any, name: str) -> None:
    if name != "runc" and name not in (engine.info().get("Runtimes") or {}):
        unavailable(f"the engine has no {name} runtime")


def config(runtime_name: str, **overrides: Any) -> IsolationConfig:
    """Small limits, so that each is reached quickly; every job sandboxed under gVisor."""
    values: dict[str, Any] = {
        "runtime": "docker",
        "scratch_mb": 32,
        "tmp_mb": 8,
        "shm_mb": 16,
        "memory_mb_per_gpu": 128,
        "pids_limit": 48,
        **({"sandbox_runtime": SANDBOX, "sandbox_all_jobs": True} if runtime_name == SANDBOX else {}),
    }
    return IsolationConfig(**(values | overrides))


def runtime(engine: Any, cfg: IsolationConfig, log_dir: Path, **extra: Any) -> DockerRuntime:
    # No NVIDIA toolkit on CI machines: the GPUs are simulated, so none is requested.
    return DockerRuntime(engine, cfg, log_dir, kill_grace_s=5, host=host_of(engine, simulated=True), **extra)


def start(runtime: DockerRuntime, spec: JobSpec, timeout_s: float = 300) -> DockerHandle:
    """Start the job as the agent does: its image pulled (or found here) first."""
    runtime.pull(spec).result(timeout=timeout_s)
    return runtime.start(spec)


def wait_exit(runtime: DockerRuntime, handle: DockerHandle, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while (code := runtime.poll(handle)) is None:
        assert time.monotonic() < deadline, f"{handle.spec.allocation_id} did not exit in {timeout_s} s"
        time.sleep(0.1)
    return code


def wait_running(handle: DockerHandle, runtime: DockerRuntime, timeout_s: float = 120) -> None:
    """Until the container runs."""
    deadline = time.monotonic() + timeout_s
    while handle.container.status != "running":
        assert runtime.poll(handle) is None, handle.log_path.read_text() if handle.log_path.exists() else "no log"
        assert time.monotonic() < deadline, "the container did not start"
        time.sleep(0.1)
        handle.container.reload()


def values(output: str) -> dict[str, str]:
    """The probes' `name=value` lines."""
    found = {}
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.isidentifier():
            found[name] = value.strip()
    return found
