"""Backyard limits: what a shed may take on now, given its owner's quiet hours, power budget
and thermal thresholds. Pure: the loop feeds it the policy from the server and fresh telemetry."""

from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nodes.agent.protocol import LimitName, LimitsReport


@dataclass(frozen=True)
class QuietHours:
    start: time
    end: time
    zone: ZoneInfo
    max_gpus: int
    power_cap_w: int | None

    def contains(self, now: datetime) -> bool:
        local = now.astimezone(self.zone).time()
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end  # the window crosses midnight


@dataclass(frozen=True)
class Policy:
    quiet_hours: QuietHours | None = None
    power_budget_w: int | None = None
    thermal_stop_c: int = 83
    thermal_resume_c: int = 75

    @classmethod
    def from_server(cls, data: dict[str, Any] | None) -> "Policy":
        if not data:
            return cls()
        return cls(
            quiet_hours=_quiet_hours(data.get("quiet_hours")),
            power_budget_w=data.get("power_budget_w"),
            thermal_stop_c=data.get("thermal_stop_c", 83),
            thermal_resume_c=data.get("thermal_resume_c", 75),
        )


def _quiet_hours(data: dict[str, Any] | None) -> QuietHours | None:
    if not data:
        return None
    try:
        zone = ZoneInfo(data.get("time_zone") or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    return QuietHours(
        start=time.fromisoformat(data["start"]),
        end=time.fromisoformat(data["end"]),
        zone=zone,
        max_gpus=int(data.get("max_gpus") or 0),
        power_cap_w=data.get("power_cap_w"),
    )


@dataclass(frozen=True)
class GpuReading:
    uuid: str
    healthy: bool = True
    temperature_c: int | None = None
    power_w: int | None = None
    power_limit_w: int | None = None


@dataclass(frozen=True)
class Limits:
    advertise: list[str]
    in_force: list[str] = field(default_factory=list)
    power_cap_w: int | None = None

    def report(self, total: int) -> LimitsReport:
        """What the heartbeat says about limits: it changes only when a limit starts or ends."""
        return {"in_force": self.in_force, "advertised_gpus": len(self.advertise), "gpus": total}


class Backyard:
    """Evaluates the limits; remembers only the thermal hold, which needs hysteresis."""

    def __init__(self) -> None:
        self.thermal_hold = False

    def evaluate(
        self, policy: Policy, gpus: list[GpuReading], busy: set[str], now: datetime, room: set[str] | None = None
    ) -> Limits:
        """`busy`: GPUs running a job; `room`: GPUs that can take one more (by default the idle
        ones; with MIG or shared slicing also busy GPUs with an instance or a share left)."""
        free = [gpu for gpu in gpus if gpu.healthy and (gpu.uuid in room if room is not None else gpu.uuid not in busy)]
        in_force: list[str] = []
        cap = None
        if self._too_hot(policy, gpus):
            in_force.append(LimitName.THERMAL)
            free = []
        quiet = policy.quiet_hours
        if quiet is not None and quiet.contains(now):
            in_force.append(LimitName.QUIET_HOURS)
            # Quiet hours limit how many GPUs run at all: more work on a GPU already busy is fine.
            partly_busy = [gpu for gpu in free if gpu.uuid in busy]
            idle = [gpu for gpu in free if gpu.uuid not in busy]
            free = partly_busy + idle[: max(0, quiet.max_gpus - len(busy))]
            cap = quiet.power_cap_w
        if policy.power_budget_w is not None:
            fitting = _within_budget(policy.power_budget_w, gpus, free, cap)
            if len(fitting) < len(free):
                in_force.append(LimitName.POWER_BUDGET)
            free = fitting
        return Limits(advertise=[gpu.uuid for gpu in free], in_force=in_force, power_cap_w=cap)

    def _too_hot(self, policy: Policy, gpus: list[GpuReading]) -> bool:
        temperatures = [gpu.temperature_c for gpu in gpus if gpu.temperature_c is not None]
        hottest = max(temperatures, default=None)
        if hottest is not None:
            if self.thermal_hold and hottest <= policy.thermal_resume_c:
                self.thermal_hold = False
            elif not self.thermal_hold and hottest >= policy.thermal_stop_c:
                self.thermal_hold = True
        return self.thermal_hold


def _within_budget(
    budget_w: int, gpus: list[GpuReading], free: list[GpuReading], cap_w: int | None
) -> list[GpuReading]:
    """The free GPUs that can take a job without the unit's measured draw passing its budget,
    counting each new job at the GPU's full (or capped) power limit."""
    drawn = sum(gpu.power_w or 0 for gpu in gpus)
    fitting = []
    for gpu in free:
        limit = gpu.power_limit_w or 0
        if cap_w is not None:
            limit = min(limit, cap_w) if limit else cap_w
        extra = max(limit - (gpu.power_w or 0), 0)
        if drawn + extra > budget_w:
            break
        drawn += extra
        fitting.append(gpu)
    return fitting
