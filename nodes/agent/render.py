"""Plain-text tables for `doctor` and `status`, readable over SSH and in a pasted support note."""

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from nodes.agent.doctor import FAIL, Check

INVENTORY_HEADER = ("GPU", "MODEL", "VRAM", "TEMP", "POWER/LIMIT", "UTIL", "MIG", "HEALTH")


def table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def inventory(gpus: list[dict[str, Any]]) -> str:
    """GPUs as `Gpu.as_report()` gives them, so that `status` can show its saved snapshot too."""
    if not gpus:
        return "no GPUs"
    return table(INVENTORY_HEADER, [_gpu_row(gpu) for gpu in gpus])


def _gpu_row(gpu: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(gpu["index"]),
        gpu["model"],
        f"{gpu['vram_mb'] / 1024:.1f} GiB",
        _unit(gpu.get("temperature_c"), " C"),
        f"{_unit(gpu.get('power_w'), '')}/{_unit(gpu.get('power_limit_w'), ' W')}",
        _unit(gpu.get("utilization_pct"), "%"),
        _mig(gpu),
        "ok" if gpu.get("healthy", True) else "UNHEALTHY: " + "; ".join(gpu.get("problems") or ["NVML said so"]),
    )


def _unit(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:g}{unit}"


def _mig(gpu: dict[str, Any]) -> str:
    if not gpu.get("mig_mode"):
        return "off"
    profiles = Counter(mig["profile"] for mig in gpu.get("mig_instances") or [])
    return "+".join(p if n == 1 else f"{p}*{n}" for p, n in profiles.items()) or "on, no instances"


def checks(results: list[Check]) -> str:
    return table(("STATUS", "CHECK", "DETAIL"), [(check.status, check.name, check.detail) for check in results])


def verdict(results: list[Check]) -> str:
    failed = [check.name for check in results if check.status == FAIL]
    if failed:
        return f"Verdict: FAILED ({', '.join(failed)})"
    return "Verdict: ready"


def status(data: dict[str, Any], *, alive: bool, now: float) -> str:
    """What `shedshare-agent status` prints from the agent's status file."""
    state = "running" if alive else f"NOT running (this is its status of {data.get('updated_at')})"
    limits = data.get("limits") or {}
    lines = [
        f"Agent pid {data.get('pid')}: {state}; started {data.get('started_at')} ({_ago(data.get('started_at'), now)})",
        _heartbeat(data, now),
        f"Connection: {data.get('connection') or 'unknown'}",
        "Limits in force: " + (", ".join(f"{key}={value}" for key, value in limits.items()) or "none"),
        "",
        _allocations(data.get("allocations") or [], now),
        "",
        "GPUs (as discovered at start-up):",
        inventory(data.get("gpus") or []),
    ]
    return "\n".join(lines)


def _heartbeat(data: dict[str, Any], now: float) -> str:
    if not data.get("last_heartbeat_at"):
        return "Last heartbeat: none sent yet"
    ok_at = data.get("last_heartbeat_ok_at")
    success = f"last success {ok_at} ({_ago(ok_at, now)})" if ok_at else "no success yet"
    if data.get("last_heartbeat_error"):
        return (
            f"Last heartbeat: FAILED {_ago(data['last_heartbeat_at'], now)}: {data['last_heartbeat_error']}; {success}"
        )
    return f"Last heartbeat: ok, {success}; server says the unit is {data.get('server_status') or 'unknown'}"


def _allocations(allocations: list[dict[str, Any]], now: float) -> str:
    if not allocations:
        return "Running: nothing"
    rows = [
        (a["id"], a["job_id"], ",".join(map(str, a["gpus"])), a["state"], _ago(a.get("started_at"), now))
        for a in allocations
    ]
    return f"Running: {len(allocations)}\n" + table(("ALLOCATION", "JOB", "GPUS", "STATE", "STARTED"), rows)


def _ago(timestamp: str | None, now: float) -> str:
    if not timestamp:
        return "-"
    seconds = max(0, int(now - datetime.fromisoformat(timestamp).timestamp()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s ago"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h ago"
