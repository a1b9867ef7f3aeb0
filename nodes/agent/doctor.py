"""The self-test behind `shedshare-agent doctor`, and the part of it `run` insists on before starting."""

import logging
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from nodes.agent import gpus, logs
from nodes.agent.client import AgentClient, AgentError
from nodes.agent.config import AgentConfig
from nodes.agent.egress import Runner, run_command
from nodes.agent.gpus import Gpu
from nodes.agent.isolation import IsolationConfig
from nodes.agent.runtime import RuntimeUnavailable
from nodes.agent.runtime.docker import connect, egress_guard, host_of
from nodes.agent.runtime.spec import Host, cpu_limit

logger = logging.getLogger(__name__)
OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
MAX_CLOCK_SKEW_S = 60
SERVER_TIMEOUT_S = 5.0
UNENROLLED_UNIT = "unenrolled"  # names the simulated GPUs' uuids when there is no unit id yet
# The NVIDIA Container Toolkit mounts the host's driver into every GPU container: each of these
# let an image escape to the host through it, until the release named.
TOOLKIT_FIXES = {"CVE-2024-0132": "1.16.2", "CVE-2025-23359": "1.17.4", "CVE-2025-23266": "1.17.8"}
TOOLKIT_VERSION = re.compile(r"version:?\s+v?(\d+(?:\.\d+)+)")  # "CLI version 1.17.8", "cli-version: 1.16.1"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, FAIL, SKIP (could not run here) or WARN (failed, but `run` starts anyway)
    detail: str


def passed(checks: list[Check]) -> bool:
    return all(check.status != FAIL for check in checks)


def examine(
    cfg: AgentConfig | None,
    simulate: str | None,
    isolation: IsolationConfig,
    *,
    client: Any = None,
    run: Runner = run_command,
) -> tuple[list[Gpu], list[Check]]:
    """Everything `doctor` checks; `cfg` is None when the unit is not enrolled yet. `client` is the
    Docker engine's (None: the local one's), `run` runs the NVIDIA Container Toolkit's commands."""
    found, driver = inventory_check(simulate, cfg.unit_id if cfg else UNENROLLED_UNIT)
    gpu_check = gpus_check(found) if driver.status == OK else Check("gpus", SKIP, "no inventory")
    runtime = runtime_checks(isolation, simulated=bool(simulate), client=client, run=run)
    checks = [driver, gpu_check, *runtime, country_check(isolation)]
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


def runtime_checks(
    isolation: IsolationConfig, *, simulated: bool, client: Any = None, run: Runner = run_command
) -> list[Check]:
    """The runtime `run` would use; under Docker also what a job gets from the engine: its CPUs,
    its egress and the NVIDIA Container Toolkit between it and the GPUs."""
    if isolation.runtime != "docker":
        if isolation.allow_unisolated_dev_runtime:
            return [Check("runtime", OK, "process (development only: jobs run unisolated)")]
        return [Check("runtime", OK, "process: takes no work without --dev-runtime; use --runtime docker")]
    toolkit = toolkit_check(simulated=simulated, run=run)
    try:
        client = connect() if client is None else client
    except RuntimeUnavailable as exc:
        no_engine = [Check(name, SKIP, "no engine") for name in ("cpus", "egress")]
        return [Check("runtime", FAIL, f"docker: {exc}"), *no_engine, toolkit]
    host = host_of(client, simulated=simulated)
    return [engine_check(client, isolation), cpus_check(host, isolation), egress_check(client, isolation), toolkit]


def engine_check(client: Any, isolation: IsolationConfig) -> Check:
    """The engine's OCI runtimes, the owner's sandbox runtime among them."""
    runtimes = client.info().get("Runtimes") or {}
    listed = ", ".join(runtimes)
    sandbox = isolation.sandbox_runtime
    if sandbox and sandbox not in runtimes:
        return Check("runtime", FAIL, f"docker: the engine has no {sandbox!r} runtime (it has {listed})")
    if not sandbox:
        rule = "; no sandbox runtime: jobs asking for a sandbox are refused"
    elif isolation.sandbox_all_jobs:
        rule = f"; every job runs under {sandbox} (sandbox_all_jobs)"
    else:
        rule = f"; jobs asking for a sandbox run under {sandbox}"
    return Check("runtime", OK, f"docker: the engine answers, with runtimes {listed}{rule}")


def cpus_check(host: Host, isolation: IsolationConfig) -> Check:
    """The engine refuses a container asking for more CPUs than the machine has, so a job's
    limit is clamped to them (as `run` logs)."""
    per_gpu = isolation.cpus_per_gpu
    if host.cpus is None:
        return Check("cpus", OK, f"the engine does not say how many CPUs it has: a job gets {per_gpu:g} per GPU")
    if cpu_limit(isolation, 1, host) < per_gpu:
        detail = f"cpus_per_gpu {per_gpu:g} is clamped to {host.cpus:g}: a job gets at most the machine's CPUs"
        return Check("cpus", OK, f"{host.cpus:g} CPUs; {detail}")
    return Check("cpus", OK, f"{host.cpus:g} CPUs: a job gets {per_gpu:g} per GPU, at most {host.cpus:g}")


def egress_check(client: Any, isolation: IsolationConfig) -> Check:
    """Like `run`, makes the unit's egress bridge if missing and puts its rules in place."""
    if not isolation.allow_egress:
        return Check("egress", OK, "egress off: no job reaches the network")
    try:
        guard = egress_guard(client, isolation)
    except RuntimeUnavailable as exc:
        return Check("egress", FAIL, str(exc))
    detail = f"jobs allowed egress reach the internet through {guard.bridge}, never the host or a private network"
    return Check("egress", OK, detail)


def toolkit_check(*, simulated: bool, run: Runner = run_command) -> Check:
    """The NVIDIA Container Toolkit's version, against the releases that closed container escapes."""
    if simulated:
        return Check("toolkit", SKIP, "simulated GPUs: no GPU is handed to a container")
    latest = max(TOOLKIT_FIXES.values(), key=_version)
    done = _toolkit_version(run)
    if done.returncode != 0:
        detail = f"the NVIDIA Container Toolkit is not installed ({done.stderr.strip() or done.returncode})"
        return Check("toolkit", FAIL, f"{detail}: install {latest} or later")
    found = TOOLKIT_VERSION.search(done.stdout)
    if found is None:
        return Check("toolkit", FAIL, f"no version in {' '.join(done.args)}'s answer {done.stdout.strip()!r}")
    version = found.group(1)
    cves = ", ".join(TOOLKIT_FIXES)
    unfixed = [f"{cve} (fixed in {fix})" for cve, fix in TOOLKIT_FIXES.items() if _version(version) < _version(fix)]
    if unfixed:
        detail = f"NVIDIA Container Toolkit {version} lets a job escape its container: {', '.join(unfixed)}"
        return Check("toolkit", FAIL, f"{detail}; upgrade to {latest} or later")
    return Check("toolkit", OK, f"NVIDIA Container Toolkit {version}, with the fixes of {cves}")


def _toolkit_version(run: Runner) -> "subprocess.CompletedProcess[str]":
    """`nvidia-ctk --version`, or where only the older CLI is installed, `nvidia-container-cli`'s."""
    done = run(["nvidia-ctk", "--version"])
    return done if done.returncode == 0 else run(["nvidia-container-cli", "--version"])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


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
