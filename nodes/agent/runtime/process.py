"""Runs a job's argv as a plain host process. Development only.

It ignores the job's image and gives no isolation beyond its own process group, a scrubbed
environment and a private working directory, so units that take renters' work use a container
runtime instead.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from nodes.agent.runtime import Handle, JobSpec, StartFailed

SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class ProcessHandle:
    spec: JobSpec
    popen: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    kill_deadline: float | None = None


class ProcessRuntime:
    def __init__(
        self,
        work_dir: Path,
        log_dir: Path,
        *,
        kill_grace_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.kill_grace_s = kill_grace_s
        self._clock = clock

    def start(self, spec: JobSpec) -> ProcessHandle:
        if not SAFE_ID.fullmatch(spec.allocation_id):
            raise StartFailed(f"unsafe allocation id {spec.allocation_id!r}")
        if not spec.command:
            raise StartFailed("the job has an empty command")
        workdir = self.work_dir / spec.allocation_id
        log_path = self.log_dir / f"{spec.allocation_id}.log"
        try:
            self._make_fresh(workdir)
            with open(log_path, "ab") as log:
                popen = subprocess.Popen(
                    spec.command,
                    cwd=workdir,
                    env=job_env(spec, workdir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise StartFailed(f"cannot run {spec.command[0]!r}: {exc}") from None
        return ProcessHandle(spec=spec, popen=popen, workdir=workdir, log_path=log_path)

    def poll(self, handle: Handle) -> int | None:
        assert isinstance(handle, ProcessHandle)
        code = handle.popen.poll()
        if code is None:
            if handle.kill_deadline is not None and self._clock() >= handle.kill_deadline:
                _signal_group(handle, signal.SIGKILL)
            return None
        if handle.kill_deadline is not None:
            # The leader is gone, but children that ignored SIGTERM may still hold the GPUs.
            _signal_group(handle, signal.SIGKILL)
        return 128 - code if code < 0 else code

    def kill(self, handle: Handle) -> None:
        assert isinstance(handle, ProcessHandle)
        if handle.kill_deadline is None:
            handle.kill_deadline = self._clock() + self.kill_grace_s
            _signal_group(handle, signal.SIGTERM)

    def cleanup(self, handle: Handle) -> None:
        """Kill anything the job left running in its group, then wipe its working directory."""
        assert isinstance(handle, ProcessHandle)
        _signal_group(handle, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            handle.popen.wait(timeout=5)
        shutil.rmtree(handle.workdir, ignore_errors=True)

    def _make_fresh(self, workdir: Path) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(mode=0o700)


def job_env(spec: JobSpec, workdir: Path) -> dict[str, str]:
    """The whole environment of a job: nothing of the agent's leaks, credentials included."""
    return {
        "PATH": os.environ.get("PATH", DEFAULT_PATH),
        "HOME": str(workdir),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "CUDA_VISIBLE_DEVICES": ",".join(spec.gpu_uuids),
        "SHEDSHARE_JOB_ID": spec.job_id,
        "SHEDSHARE_ALLOCATION_ID": spec.allocation_id,
    }


def _signal_group(handle: ProcessHandle, sig: signal.Signals) -> None:
    # The job runs in its own session, so its process group id is the leader's pid.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(handle.popen.pid, sig)
