"""The self-test behind `shedshare-agent doctor`, and the part of it `run` insists on before starting."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import httpx

from nodes.agent import gpus, logs
from nodes.agent.client import AgentClient, AgentError
from nodes.agent.config import AgentConfig
from nodes.agent.gpus import Gpu
from nodes.agent.isolation import IsolationConfig
from nodes.agent.runtime import RuntimeUnavailable
from nodes.agent.runtime.docker import connect

logger = logging.getLogger(__name__)
OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
MAX_CLOCK_SKEW_S = 60
SERVER_TIMEOUT_S = 5.0
UNENROLLED_UNIT = "unenrolled"  # names the simulated GPUs' uuids when there is no unit id yet


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, FAIL, SKIP (could not run here) or WARN (failed, but `run` starts anyway)
    detail: str


def passed(checks: list[Check]) -> bool:
    return all(check.status != FAIL for check in checks)


def examine(cfg: AgentConfig | None, simulate: str | None, isolation: IsolationConfig) -> tuple[list[Gpu], list[Check]]:
    """Everything `doctor` checks; `cfg` is None when the unit is not enrolled yet."""
    found, driver = inventory_check(simulate, cfg.unit_id if cfg else UNENROLLED_UNIT)
    gpu_check = gpus_check(found) if driver.status == OK else Check("gpus", SKIP, "no inventory")
    checks = [driver, gpu_check, runtime_check(isolation), country_check(isolation)]
    return found, checks + server_checks(cfg, required=True)


def preflight(cfg: AgentConfig, found: list[Gpu]) -> list[Check]:
    """What `run` checks once it has its inventory and runtime, each logged."""
    # An unreachable server only warns: the agent is built to start while the server is down and
    # to keep retrying, so that a unit rebooting during a server outage comes back by itself.
    checks = [gpus_check(found), country_check(cfg.isolation), *server_checks(cfg, required=False)]
    for check in checks:
        level = logging.INFO if check.status in (OK, SKIP) else logging.WARNING
        logs.event(logger, "self_test", level, check=check.name, status=check.status, detail=check.detail)
    return checks


def inventory_check(simulate: str | None, unit_id: str) -> tuple[list[Gpu], Check]:
    try:
        found = gpus.simulate(simulate, unit_id) if simulate else gpus.discover()
    except gpus.InventoryError as exc:
        return [], Check("driver", FAIL, str(exc))
    source = f"simulated ({simulate})" if simulate else "NVML"
    versions = f"driver {found[0].driver_version}, CUDA {found[0].cuda_version}" if found else "no GPUs"
    return found, Check("driver", OK, f"{source}: {versions}")


def gpus_check(found: list[Gpu]) -> Check:
    if not found:
        return Check("gpus", FAIL, "no GPUs found")
    sick = [gpu for gpu in found if not gpu.healthy]
    if not sick:
        return Check("gpus", OK, f"{len(found)} of {len(found)} healthy")
    return Check("gpus", FAIL, "; ".join(f"GPU {gpu.index}: {', '.join(gpu.problems)}" for gpu in sick))


def country_check(isolation: IsolationConfig) -> Check:
    """The country the agent checks jobs' residency against and reports in its heartbeats."""
    if isolation.country is None:
        detail = (
            "no country configured: the agent refuses every job restricted to jurisdictions; set `country` in the "
            "config (or SHEDSHARE_AGENT_COUNTRY) to the unit's declared country"
        )
        return Check("country", WARN, detail)
    return Check("country", OK, f"{isolation.country}, reported to the server with each heartbeat")


def runtime_check(isolation: IsolationConfig) -> Check:
    if isolation.runtime != "docker":
        if isolation.allow_unisolated_dev_runtime:
            return Check("runtime", OK, "process (development only: jobs run unisolated)")
        return Check("runtime", OK, "process: takes no work without --dev-runtime; use --runtime docker")
    try:
        connect(isolation.sandbox_runtime)
    except RuntimeUnavailable as exc:
        return Check("runtime", FAIL, f"docker: {exc}")
    sandbox = f", with sandbox runtime {isolation.sandbox_runtime}" if isolation.sandbox_runtime else ""
    return Check("runtime", OK, f"docker: the engine answers{sandbox}")


def server_checks(
    cfg: AgentConfig | None,
    *,
    required: bool,
    transport: httpx.BaseTransport | None = None,
    now: Callable[[], float] = time.time,
) -> list[Check]:
    if cfg is None:
        return [Check("server", SKIP, "not enrolled"), Check("clock", SKIP, "not enrolled")]
    try:
        with AgentClient(cfg.url, timeout_s=SERVER_TIMEOUT_S, transport=transport) as client:
            date = client.server_date()
    except AgentError as exc:
        return [Check("server", FAIL if required else WARN, str(exc)), Check("clock", SKIP, "server not reachable")]
    return [Check("server", OK, f"{cfg.url} answers"), clock_check(date, now())]


def clock_check(server_date: datetime | None, local: float) -> Check:
    if server_date is None:
        return Check("clock", SKIP, "the server sent no Date header")
    skew = local - server_date.timestamp()
    if abs(skew) > MAX_CLOCK_SKEW_S:
        detail = f"this clock is {skew:+.0f} s off the server's (at most {MAX_CLOCK_SKEW_S} s allowed); check NTP"
        return Check("clock", FAIL, detail)
    return Check("clock", OK, f"within {abs(skew):.0f} s of the server's")
