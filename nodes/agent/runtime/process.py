"""Runs a job's argv as a plain host process. Development only.

It ignores the job's image (nothing is pulled) and gives no isolation beyond its own process
group, a scrubbed environment, a private working directory and, when the agent runs as root, an
unprivileged user (`job_user.py`), so units that take renters' work use a container runtime
instead. Jobs run under `shim.py`, which records their exit code in a file, so that a job
outlives the agent and a restarted agent can adopt it again; as root the shim stays root to
write that file into the agent's private state and runs the job itself as the job user.
"""

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.agent import files
from nodes.agent.protocol import RunsIn
from nodes.agent.runtime import Adopted, Handle, JobSpec, StartFailed, shim
from nodes.agent.runtime.environment import NO_SECRETS, job_variables
from nodes.agent.runtime.job_user import JobUser, hand_over, jobs_root

SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SHIM = Path(shim.__file__)
KILLED = 128 + signal.SIGKILL


@dataclass
class ProcessHandle:
    spec: JobSpec
    pid: int  # the shim's, which leads the job's session and process group
    started: str | None  # the pid's start time in ticks since boot, so a reused pid is not taken for it
    workdir: Path
    log_path: Path
    exit_path: Path
    popen: subprocess.Popen[bytes] | None = None  # None when adopted after a restart
    kill_deadline: float | None = None


class ProcessRuntime:
    def __init__(
        self,
        work_dir: Path,
        log_dir: Path,
        *,
        kill_grace_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        job_user: JobUser | None = None,
    ) -> None:
        """`job_user`: who jobs run as (the agent runs as root); None: the agent's own user."""
        self.work_dir = jobs_root(work_dir, job_user) if job_user else work_dir
        self.log_dir = log_dir
        self.kill_grace_s = kill_grace_s
        self.job_user = job_user
        self._clock = clock
        self._staged: set[str] = set()  # allocations whose working directory holds staged data

    def make_scratch(self, spec: JobSpec) -> Path:
        """The job's working directory, its HOME, made now with `inputs/` and `outputs/`."""
        workdir = self._workdir(spec)
        self._make_fresh(workdir)
        for name in ("inputs", "outputs"):
            (workdir / name).mkdir(mode=0o700)
        self._staged.add(spec.allocation_id)
        return workdir

    def scratch(self, spec: JobSpec) -> Path:
        return self._workdir(spec)

    def drop_scratch(self, spec: JobSpec) -> None:
        self._staged.discard(spec.allocation_id)
        shutil.rmtree(self._workdir(spec), ignore_errors=True)

    def runs_in(self, spec: JobSpec) -> str:
        return RunsIn.PROCESS

    def start(self, spec: JobSpec, secrets: Mapping[str, str] = NO_SECRETS) -> ProcessHandle:
        workdir = self._workdir(spec)
        if not spec.command:
            raise StartFailed("the job has an empty command")
        log_path = self.log_dir / f"{spec.allocation_id}.log"
        exit_path = self.log_dir / f"{spec.allocation_id}.exit"
        own = _own_env(spec, workdir)
        if shutil.which(spec.command[0], path=own["PATH"]) is None:
            raise StartFailed(f"cannot run {spec.command[0]!r}: not found or not executable")
        try:
            if spec.allocation_id in self._staged:
                self._staged.discard(spec.allocation_id)
                if self.job_user:
                    hand_over(workdir, self.job_user)  # the agent fetched the inputs as itself
            else:
                self._make_fresh(workdir)
            files.remove(exit_path)
            as_user = ["--user", f"{self.job_user.uid}:{self.job_user.gid}"] if self.job_user else []
            with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
                # The shim runs with the runtime's variables only: as root, with the renter's
                # it would load whatever LD_PRELOAD names. The job's whole environment, secrets
                # included, reaches it through a pipe, never a file or its command line.
                popen = subprocess.Popen(
                    [sys.executable, "-I", str(SHIM), str(exit_path), *as_user, "--", *spec.command],
                    cwd=workdir,
                    env=own,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            assert popen.stdin is not None
            with popen.stdin:
                popen.stdin.write(json.dumps(job_env(spec, workdir, secrets)).encode())
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise StartFailed(f"cannot run {spec.command[0]!r}: {exc}") from None
        return ProcessHandle(spec, popen.pid, _start_ticks(popen.pid), workdir, log_path, exit_path, popen)

    def poll(self, handle: Handle) -> int | None:
        assert isinstance(handle, ProcessHandle)
        if _alive(handle):
            if handle.kill_deadline is not None and self._clock() >= handle.kill_deadline:
                _signal_group(handle, signal.SIGKILL)
            return None
        if handle.kill_deadline is not None:
            # The leader is gone, but children that ignored SIGTERM may still hold the GPUs.
            _signal_group(handle, signal.SIGKILL)
        return _exit_code(handle)

    def port_address(self, handle: Handle, port: int) -> tuple[str, int]:
        """The job's port on the host's loopback: a process shares the host's network (and so
        its ports with other jobs: development only). Only while one of the job's own processes
        listens on it there: else a renter declaring port 22 would reach the host's SSH."""
        assert isinstance(handle, ProcessHandle)
        address = _listening(_session_pids(handle.pid)).get(port)
        if address is None:
            raise StartFailed(f"the job does not listen on port {port}")
        return (address, port)

    def kill(self, handle: Handle) -> None:
        assert isinstance(handle, ProcessHandle)
        if handle.kill_deadline is None:
            handle.kill_deadline = self._clock() + self.kill_grace_s
            if _alive(handle):
                _signal_group(handle, signal.SIGTERM)

    def cleanup(self, handle: Handle) -> None:
        """Kill anything the job left running in its group, then wipe its working directory."""
        assert isinstance(handle, ProcessHandle)
        _signal_group(handle, signal.SIGKILL)
        if handle.popen is not None:
            with suppress(subprocess.TimeoutExpired):
                handle.popen.wait(timeout=5)
        shutil.rmtree(handle.workdir, ignore_errors=True)
        files.remove(handle.exit_path)

    def describe(self, handle: Handle) -> dict[str, Any]:
        assert isinstance(handle, ProcessHandle)
        paths = {"workdir": str(handle.workdir), "log_path": str(handle.log_path), "exit_path": str(handle.exit_path)}
        return {"pid": handle.pid, "started": handle.started, "boot_id": _boot_id(), **paths}

    def adopt(self, spec: JobSpec, saved: dict[str, Any]) -> Adopted | None:
        if not saved:
            return None  # stopped while starting it: a process cannot be found without its pid
        paths = (Path(saved["workdir"]), Path(saved["log_path"]), Path(saved["exit_path"]))
        handle = ProcessHandle(spec, int(saved["pid"]), saved.get("started"), *paths)
        if saved.get("boot_id") == _boot_id() and _alive(handle):
            return Adopted(handle)
        exited = _read_exit(handle.exit_path)
        if exited is None:
            return None
        return Adopted(handle, exit_code=exited[0], exited_at=exited[1])

    def _workdir(self, spec: JobSpec) -> Path:
        if not SAFE_ID.fullmatch(spec.allocation_id):
            raise StartFailed(f"unsafe allocation id {spec.allocation_id!r}")
        return self.work_dir / spec.allocation_id

    def _make_fresh(self, workdir: Path) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o711 if self.job_user else 0o700)
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(mode=0o700)
        if self.job_user:
            os.chown(workdir, self.job_user.uid, self.job_user.gid)


def job_env(spec: JobSpec, workdir: Path, secrets: Mapping[str, str] = NO_SECRETS) -> dict[str, str]:
    """The whole environment of a job: its variables and secrets, then the runtime's own, which
    win. Nothing of the agent's own environment leaks, credentials included."""
    own = _own_env(spec, workdir)
    return {**job_variables(spec, secrets, own), **own}


def _own_env(spec: JobSpec, workdir: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", DEFAULT_PATH),
        "HOME": str(workdir),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "CUDA_VISIBLE_DEVICES": ",".join(spec.gpu_uuids),
        "SHEDSHARE_JOB_ID": spec.job_id,
        "SHEDSHARE_ALLOCATION_ID": spec.allocation_id,
    }


def _signal_group(handle: ProcessHandle, sig: signal.Signals) -> None:
    # The job runs in its own session, so its process group id is the leader's pid. That pid is
    # not reused while the group has members, so if another process owns it now the group is gone.
    stat = _proc_stat(handle.pid)
    if stat is not None and handle.started is not None and stat[1] != handle.started:
        return
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(handle.pid, sig)


def _alive(handle: ProcessHandle) -> bool:
    if handle.popen is not None:
        return handle.popen.poll() is None
    stat = _proc_stat(handle.pid)
    return stat is not None and stat[1] == handle.started and stat[0] not in ("Z", "X")


def _exit_code(handle: ProcessHandle) -> int:
    exited = _read_exit(handle.exit_path)
    if exited is not None:
        return exited[0]
    if handle.popen is not None and handle.popen.returncode is not None:
        # No file: the shim died of a signal before the job ran, or could not write it.
        code = handle.popen.returncode
        return 128 - code if code < 0 else code
    return KILLED  # an adopted job whose shim was killed: nobody recorded how the job ended


def _read_exit(path: Path) -> tuple[int, float] | None:
    try:
        data = files.read_json(path)
        return int(data["exit_code"]), float(data["exited_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in ticks since boot) of a process, from Linux's /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


def _start_ticks(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _session_pids(session: int) -> list[int]:
    """The processes of a session (a job started with start_new_session leads its own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session:  # the fields after the name: state, ppid, pgrp, session
                    pids.append(int(entry.name))
    return pids


def _listening(pids: list[int]) -> dict[int, str]:
    """The TCP ports these processes listen on, each with the address to reach it at (the one
    bound; loopback for a socket bound to every address), from Linux's /proc. The address
    matters: a job bound to 127.0.0.2:6379 must not lead the agent to the host's 127.0.0.1:6379."""
    inodes = set()
    for pid in pids:
        with suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    hex_address, hex_port = fields[1].rsplit(":", 1)
                    ports.setdefault(int(hex_port, 16), _proc_address(hex_address))
    return ports


def _proc_address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (little-endian 32-bit words), to connect to."""
    raw = bytes.fromhex(hex_address)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        address = ipaddress.IPv4Address(raw)
        return "127.0.0.1" if address.is_unspecified else str(address)
    address = ipaddress.IPv6Address(raw)
    if address.ipv4_mapped is not None:
        return "127.0.0.1" if address.ipv4_mapped.is_unspecified else str(address.ipv4_mapped)
    return "::1" if address.is_unspecified else str(address)


def _boot_id() -> str:
    # After a reboot pids and start times repeat; the boot id tells the two boots apart.
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
