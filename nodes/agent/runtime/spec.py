"""The container a job runs in, as plain `docker containers.create` keyword arguments.

Pure: no Docker SDK here, so every hardening flag is unit-tested on machines without an engine.
The Docker runtime turns `GpuRequest` into `docker.types.DeviceRequest` at its boundary.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.agent.isolation import LEVELS, IsolationConfig
from nodes.agent.runtime import JobSpec
from nodes.agent.runtime.environment import NO_SECRETS, job_variables

NOBODY_ID = 65534
NOBODY = f"{NOBODY_ID}:{NOBODY_ID}"
# gVisor runs each of the job's processes on several host threads (its own, and the platform's),
# and the host's pids limit counts them all: a job at its limit would kill the whole sandbox. So a
# sandbox gets a host ceiling this much wider and the job's own limit is kept inside the sandbox,
# as RLIMIT_NPROC, which gVisor counts per sandbox (measured: about 9 host threads per process).
SANDBOX_HOST_PIDS_PER_TASK = 12
SANDBOX_HOST_PIDS_BASE = 512
LABEL_ALLOCATION = "shedshare.allocation"
LABEL_JOB = "shedshare.job"


class SpecError(Exception):
    pass


@dataclass(frozen=True)
class GpuRequest:
    """The fields of docker.types.DeviceRequest that pin a container to named GPUs."""

    device_ids: tuple[str, ...]
    driver: str = "nvidia"
    capabilities: tuple[tuple[str, ...], ...] = (("gpu",),)


@dataclass(frozen=True)
class Host:
    """What the engine's machine has, which the limits must fit."""

    cpus: float | None = None  # the engine refuses a container asking for more CPUs than this
    gpus: bool = True  # False for simulated GPUs: there is no device to request


def cpu_limit(cfg: IsolationConfig, gpus: int, host: Host) -> float:
    """`cpus_per_gpu` for each GPU, but never more CPUs than the machine has."""
    wanted = cfg.cpus_per_gpu * gpus
    return min(wanted, host.cpus) if host.cpus else wanted


def container_name(allocation_id: str) -> str:
    return f"shedshare-{allocation_id}"


JOB_NETWORK_PREFIX = "shedshare-job-"


def job_network(allocation_id: str) -> str:
    """The private network of a job that serves ports and may not reach out: internal (no route
    anywhere), its container alone on it, so that the agent on the host reaches its ports and
    nothing else does."""
    return f"{JOB_NETWORK_PREFIX}{allocation_id}"


def network_mode(spec: JobSpec, cfg: IsolationConfig) -> str:
    if spec.network_egress:
        return cfg.egress_network  # its bridge keeps containers apart (no inter-container traffic)
    return job_network(spec.allocation_id) if spec.ports else "none"


def sandboxed(spec: JobSpec, cfg: IsolationConfig) -> bool:
    """Whether the job runs in the sandbox: when it asks, or when the owner sandboxes every job."""
    return spec.sandboxed or cfg.sandbox_all_jobs


ANY_HOST = Host()


def container_spec(
    spec: JobSpec,
    cfg: IsolationConfig,
    host: Host = ANY_HOST,
    secrets: Mapping[str, str] = NO_SECRETS,
    scratch: Path | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `containers.create`; raises SpecError for a job it cannot isolate.
    `secrets` holds the values of `spec.secrets`; `scratch`, the host folder of the job's staged
    data, whose `inputs/` and `outputs/` it sees as /scratch/inputs and /scratch/outputs."""
    _validate(spec, cfg)
    gpus = len(spec.gpu_uuids)
    in_sandbox = sandboxed(spec, cfg)
    return {
        "image": spec.image,
        "command": list(spec.command),
        "name": container_name(spec.allocation_id),
        "labels": {LABEL_ALLOCATION: spec.allocation_id, LABEL_JOB: spec.job_id},
        "environment": _environment(spec, secrets),
        "working_dir": "/scratch",
        "user": NOBODY,
        "privileged": False,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "read_only": True,
        # tmpfs lives only as long as the container, so scratch is wiped with it; the only host
        # mounts are the job's staged data, which outlive the container for the outputs' upload.
        # Scratch is the job's HOME: owned by the job's user through the mount itself (runc 1.1
        # resets a tmpfs's mode to that of the directory Docker made for `working_dir`, so a mode
        # alone leaves it root's), and executable, since Python packages, compiled kernels and
        # JIT caches live there. /tmp stays noexec.
        "tmpfs": {
            "/scratch": f"size={cfg.scratch_mb}m,uid={NOBODY_ID},gid={NOBODY_ID},mode=0700,exec,nosuid,nodev",
            "/tmp": f"size={cfg.tmp_mb}m,mode=1777,nosuid,nodev,noexec",  # noqa: S108 - the container's own /tmp
        },
        "ipc_mode": "private",
        "shm_size": f"{cfg.shm_mb}m",
        "pids_limit": _host_pids(cfg, in_sandbox),
        "mem_limit": f"{cfg.memory_mb_per_gpu * gpus}m",
        "memswap_limit": f"{cfg.memory_mb_per_gpu * gpus}m",  # equal to mem_limit: no swap
        "nano_cpus": round(cpu_limit(cfg, gpus, host) * 1e9),
        "network_mode": network_mode(spec, cfg),
        "device_requests": [GpuRequest(device_ids=spec.gpu_uuids)] if host.gpus else [],
        # An init as PID 1 forwards SIGTERM and reaps orphans, so a stop reaches the real job.
        "init": True,
        # Otherwise the engine copies the owner's proxy settings into the renter's environment.
        "use_config_proxy": False,
        "log_config": {"type": "json-file", "config": {"max-size": "50m", "max-file": "1"}},
        **(_sandbox(cfg) if in_sandbox else {}),
        **(_data_mounts(scratch) if scratch is not None else {}),
    }


def _data_mounts(scratch: Path) -> dict[str, Any]:
    # Mounted over the /scratch tmpfs: the engine mounts the shallower path first.
    binds = {str(scratch / name): {"bind": f"/scratch/{name}", "mode": "rw"} for name in ("inputs", "outputs")}
    return {"volumes": binds}


def _host_pids(cfg: IsolationConfig, in_sandbox: bool) -> int:
    if in_sandbox:
        return cfg.pids_limit * SANDBOX_HOST_PIDS_PER_TASK + SANDBOX_HOST_PIDS_BASE
    return cfg.pids_limit


def _sandbox(cfg: IsolationConfig) -> dict[str, Any]:
    nproc = {"name": "nproc", "soft": cfg.pids_limit, "hard": cfg.pids_limit}
    return {"runtime": cfg.sandbox_runtime, "ulimits": [nproc]}


def _validate(spec: JobSpec, cfg: IsolationConfig) -> None:
    if spec.isolation not in LEVELS:
        raise SpecError(f"unknown isolation level {spec.isolation!r}")
    if not spec.gpu_uuids:
        raise SpecError("a job without GPUs")
    if not spec.image or not spec.command:
        raise SpecError("a job needs an image and a command")
    if sandboxed(spec, cfg) and not cfg.sandbox_runtime:
        raise SpecError("the job asks for a sandbox and this unit has no sandbox_runtime")
    if spec.network_egress and not (cfg.allow_egress and cfg.egress_network):
        raise SpecError("the job may reach the network and this unit allows no egress")


def _environment(spec: JobSpec, secrets: Mapping[str, str]) -> dict[str, str]:
    # CUDA images set NVIDIA_VISIBLE_DEVICES=all and the NVIDIA runtime honours the variable,
    # so it is pinned to exactly the assigned devices as well as the device request.
    devices = ",".join(spec.gpu_uuids)
    own = {
        "NVIDIA_VISIBLE_DEVICES": devices,
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        "HOME": "/scratch",
        "SHEDSHARE_JOB_ID": spec.job_id,
        "SHEDSHARE_ALLOCATION_ID": spec.allocation_id,
    }
    return {**job_variables(spec, secrets, own), **own}
