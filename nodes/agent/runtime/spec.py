"""The container a job runs in, as plain `docker containers.create` keyword arguments.

Pure: no Docker SDK here, so every hardening flag is unit-tested on machines without an engine.
The Docker runtime turns `GpuRequest` into `docker.types.DeviceRequest` at its boundary.
"""

from dataclasses import dataclass
from typing import Any

from nodes.agent.isolation import LEVELS, IsolationConfig
from nodes.agent.runtime import JobSpec

NOBODY = "65534:65534"
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


def container_name(allocation_id: str) -> str:
    return f"shedshare-{allocation_id}"


def container_spec(spec: JobSpec, cfg: IsolationConfig) -> dict[str, Any]:
    """Keyword arguments for `containers.create`; raises SpecError for a job it cannot isolate."""
    _validate(spec, cfg)
    gpus = len(spec.gpu_uuids)
    return {
        "image": spec.image,
        "command": list(spec.command),
        "name": container_name(spec.allocation_id),
        "labels": {LABEL_ALLOCATION: spec.allocation_id, LABEL_JOB: spec.job_id},
        "environment": _environment(spec),
        "working_dir": "/scratch",
        "user": NOBODY,
        "privileged": False,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "read_only": True,
        # tmpfs lives only as long as the container, so scratch is wiped with it; no host mounts.
        "tmpfs": {
            "/scratch": f"size={cfg.scratch_mb}m,mode=1777,nosuid,nodev",
            "/tmp": f"size={cfg.tmp_mb}m,mode=1777,nosuid,nodev,noexec",  # noqa: S108 - the container's own /tmp
        },
        "ipc_mode": "private",
        "shm_size": f"{cfg.shm_mb}m",
        "pids_limit": cfg.pids_limit,
        "mem_limit": f"{cfg.memory_mb_per_gpu * gpus}m",
        "memswap_limit": f"{cfg.memory_mb_per_gpu * gpus}m",  # equal to mem_limit: no swap
        "nano_cpus": round(cfg.cpus_per_gpu * gpus * 1e9),
        "network_mode": cfg.egress_network if spec.network_egress else "none",
        "device_requests": [GpuRequest(device_ids=spec.gpu_uuids)],
        # An init as PID 1 forwards SIGTERM and reaps orphans, so a stop reaches the real job.
        "init": True,
        # Otherwise the engine copies the owner's proxy settings into the renter's environment.
        "use_config_proxy": False,
        "log_config": {"type": "json-file", "config": {"max-size": "50m", "max-file": "1"}},
        **({"runtime": cfg.sandbox_runtime} if spec.sandboxed else {}),
    }


def _validate(spec: JobSpec, cfg: IsolationConfig) -> None:
    if spec.isolation not in LEVELS:
        raise SpecError(f"unknown isolation level {spec.isolation!r}")
    if not spec.gpu_uuids:
        raise SpecError("a job without GPUs")
    if not spec.image or not spec.command:
        raise SpecError("a job needs an image and a command")
    if spec.sandboxed and not cfg.sandbox_runtime:
        raise SpecError("the job asks for a sandbox and this unit has no sandbox_runtime")
    if spec.network_egress and not cfg.egress_network:
        raise SpecError("the job may reach the network and this unit has no egress_network")


def _environment(spec: JobSpec) -> dict[str, str]:
    # CUDA images set NVIDIA_VISIBLE_DEVICES=all and the NVIDIA runtime honours the variable,
    # so it is pinned to exactly the assigned devices as well as the device request.
    devices = ",".join(spec.gpu_uuids)
    return {
        "NVIDIA_VISIBLE_DEVICES": devices,
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        "HOME": "/scratch",
        "SHEDSHARE_JOB_ID": spec.job_id,
        "SHEDSHARE_ALLOCATION_ID": spec.allocation_id,
    }
