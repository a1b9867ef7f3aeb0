import copy
import re
import uuid
from dataclasses import dataclass

from django.db.models import Count, Exists, IntegerField, OuterRef, Prefetch, Q, Subquery
from django.db.models.functions import Coalesce
from django.utils.crypto import salted_hmac
from django_countries import countries

from nodes import ports, services, streams
from nodes.agent.protocol import LIMIT_NAME_PATTERN
from nodes.models import GPU, Slice, Unit, interruptible_price


def _per_unit(gpus, value) -> Subquery:
    """One aggregate over the unit's present GPUs, as a correlated subquery: joining GPUs and
    slices in the outer query would multiply the rows under every sum."""
    rows = gpus.filter(unit=OuterRef("pk"), present=True).order_by().values("unit").annotate(value=value)
    return Subquery(rows.values("value"), output_field=IntegerField())


def units_for(user):
    """The caller's units with live GPU figures for the portal: GPUs present, busy (running at
    least one lease) and free (healthy and idle), the hottest GPU and the draw of all of them,
    from the latest telemetry. One query however many units."""
    gpus = GPU.objects.annotate(busy=Exists(ports.slices_leased().filter(gpu=OuterRef("pk"))))
    free = ports.slices_free()
    return Unit.objects.visible_to(user).annotate(
        gpu_total=Coalesce(_per_unit(gpus, Count("pk")), 0),
        gpu_busy=Coalesce(_per_unit(gpus.filter(busy=True), Count("pk")), 0),
        # Free as offers and placement count it: a GPU with a free slice (quiet hours close some).
        gpu_free=Coalesce(_per_unit(gpus.filter(Exists(free.filter(gpu=OuterRef("pk")))), Count("pk")), 0),
    )


def with_telemetry(units: list[Unit]) -> list[Unit]:
    """The units with their latest readings (kept outside the database, nodes/streams.py):
    ``hottest_c`` and ``power_w`` (the draw of all their GPUs), None where none came lately."""
    latest = streams.telemetry_latest([unit.pk for unit in units])
    for unit in units:
        gpus = (latest.get(str(unit.pk)) or {}).get("gpus") or []
        temperatures = [g["temperature_c"] for g in gpus if g.get("temperature_c") is not None]
        powers = [g["power_w"] for g in gpus if g.get("power_w") is not None]
        unit.hottest_c = max(temperatures, default=None)
        unit.power_w = round(sum(powers)) if powers else None
        unit.gpu_readings = {g.get("uuid"): g for g in gpus}
    return units


def unit_gpus(unit: Unit) -> list[GPU]:
    """The unit's GPUs with the slices its policy cuts them into now (and any still leased),
    each slice marked ``leased``."""
    leased = Exists(ports.slices_leased().filter(pk=OuterRef("pk")))
    slices = Slice.objects.annotate(leased=leased).filter(Q(advertised=True) | Q(leased=True)).order_by("share_index")
    gpus = list(unit.gpus.filter(present=True).prefetch_related(Prefetch("slices", queryset=slices)))
    readings = getattr(unit, "gpu_readings", None)
    if readings is None:
        readings = with_telemetry([unit])[0].gpu_readings
    for gpu in gpus:
        reading = readings.get(gpu.device_uuid) or {}
        gpu.temperature_c, gpu.power_w = reading.get("temperature_c"), reading.get("power_w")
    return gpus


@dataclass(frozen=True)
class Running:
    """A job running on the unit as its owner may see it: never who the renter is."""

    job: str
    renter: str
    gpus: list[int]
    started_at: object
    interruptible: bool
    price_per_gpu_hour_micros: int
    why: str = ""  # what would stop it: set on the owner's warning before a location change
    ports: tuple[int, ...] = ()  # what it serves through the relay
    served_bytes: int = 0  # bytes its ports served, both ways, since it began


def residency_stops(unit: Unit, *, country: str, subdivision: str) -> list[Running]:
    """The running jobs that declaring the unit at (country, subdivision) would stop."""
    return ports.residency_stops(unit, country, subdivision)


def unit_running(unit: Unit) -> list[Running]:
    """What runs on the unit now, the renter shown only by an alias (the jobs app answers)."""
    return ports.unit_running(unit)


def unit_jobs_counted(unit: Unit) -> int:
    """How many jobs the unit's reliability counts (0: no history yet; the jobs app answers)."""
    return ports.unit_jobs_counted(unit)


def renter_alias(*, owner_id, renter_id) -> str:
    """A stable name for a renter as one owner sees them, e.g. "renter 7f3a9c": keyed with the
    secret key and the owner, so it tells owners nothing about who the renter is and two owners
    cannot match their renters up."""
    digest = salted_hmac("shedshare.portal.renter_alias", f"{owner_id}:{renter_id}").hexdigest()
    return f"renter {digest[:6]}"


MAX_GPUS = 64  # a unit reports at most this many GPUs (the heartbeat's bound)


@dataclass(frozen=True)
class LimitsShown:
    in_force: list[str]
    advertised_gpus: int | None
    gpus: int | None


def unit_limits(unit: Unit) -> LimitsShown:
    """The backyard limits the unit's agent last reported (``protocol.LimitsReport``), for pages
    and offers. Read defensively: a row stored before heartbeats were validated may hold any
    shape, and what does not fit the protocol shows as no limit rather than breaking a page."""
    stored = unit.limits if isinstance(unit.limits, dict) else {}
    names = stored.get("in_force")
    names = names if isinstance(names, list) else []

    def count(key: str) -> int | None:
        value = stored.get(key)
        return value if type(value) is int and 0 <= value <= MAX_GPUS else None

    in_force = [name for name in names if isinstance(name, str) and re.fullmatch(LIMIT_NAME_PATTERN, name)]
    return LimitsShown(in_force=in_force[:8], advertised_gpus=count("advertised_gpus"), gpus=count("gpus"))


def limits_explained(unit: Unit, *, hottest_c: int | None = None) -> list[str]:
    """Why the unit offers less than it has, in words, from what its agent last reported."""
    reasons = []
    if unit.status == Unit.Status.DRAINING:
        reasons.append("Draining for maintenance: running jobs finish, no new work is placed")
    for name in unit_limits(unit).in_force:
        explain = _LIMIT_REASONS.get(name)
        reasons.append(explain(unit, hottest_c) if explain else f"{name.replace('_', ' ').capitalize()} (as reported)")
    return reasons


def _quiet_hours_reason(unit: Unit, _hottest_c) -> str:
    if unit.quiet_hours_start is None or unit.quiet_hours_end is None:
        return "Quiet hours"
    window = f"{unit.quiet_hours_start:%H:%M}–{unit.quiet_hours_end:%H:%M} ({unit.time_zone})"
    gpus = unit.quiet_hours_max_gpus
    text = f"Quiet hours {window}: at most {gpus} GPU{'' if gpus == 1 else 's'} take{'s' if gpus == 1 else ''} new work"
    if unit.quiet_hours_power_cap_w:
        text += f", each capped at {unit.quiet_hours_power_cap_w} W"
    return text


def _power_reason(unit: Unit, _hottest_c) -> str:
    if unit.power_budget_kw is None:
        return "Power budget"
    return f"Power budget {unit.power_budget_kw} kW: too little headroom left for another job"


def _thermal_reason(unit: Unit, hottest_c) -> str:
    resume = f"no new work until it is at or below {unit.thermal_resume_c} °C"
    if hottest_c is not None and hottest_c >= unit.thermal_stop_c:
        return f"Temperature {hottest_c} °C ≥ {unit.thermal_stop_c} °C stop threshold: {resume}"
    if hottest_c is not None:
        return f"Temperature {hottest_c} °C, still above the {unit.thermal_resume_c} °C resume threshold: {resume}"
    return f"Temperature reached the {unit.thermal_stop_c} °C stop threshold: {resume}"


_LIMIT_REASONS = {"quiet_hours": _quiet_hours_reason, "power_budget": _power_reason, "thermal": _thermal_reason}


def unit_placement_holds(unit: Unit) -> list[str]:
    """What keeps jobs away from the unit beyond its status and limits, in words for its owner."""
    holds = []
    if unit.review_since is not None:
        holds.append(
            f"Under review since {unit.review_since:%Y-%m-%d %H:%M} UTC: {unit.review_reason}. No new job is placed "
            "on the unit until an operator has looked into its agent's usage reports; jobs running now go on. "
            "Contact an operator."
        )
    if unit.agent_country and unit.agent_country != unit.country.code:
        holds.append(
            f"The agent is configured for {countries.name(unit.agent_country)} ({unit.agent_country}), but the "
            f"unit is declared in {unit.country.name} ({unit.country.code}): it gets no job restricted to "
            "jurisdictions until the two agree. Correct the agent's `country` setting, or the declared location."
        )
    return holds


@dataclass(frozen=True)
class Location:
    """The unit's location evidence, as its owner sees it."""

    declared: str
    declared_name: str
    declared_subdivision: str
    observed: str
    observed_name: str
    observed_at: object
    attested: bool
    attested_earlier: bool
    verified: bool
    mismatch: bool


def unit_location(unit: Unit) -> Location:
    return Location(
        declared=unit.country.code,
        declared_name=unit.country.name,
        declared_subdivision=unit.subdivision,
        observed=unit.observed_country,
        observed_name=countries.name(unit.observed_country) if unit.observed_country else "",
        observed_at=unit.observed_at,
        attested=services.location_attested(unit),
        attested_earlier=unit.attested_at is not None and not services.location_attested(unit),
        verified=unit.location_verified,
        mismatch=services.location_mismatch(unit),
    )


@dataclass(frozen=True)
class SlicePrice:
    kind: str
    on_demand_micros: int
    interruptible_micros: int


# An 80 GB GPU with one 10 GB MIG instance: what the portal prices each kind of slice on.
_SAMPLE_GPU = services.GpuReport(
    index=0,
    uuid="sample",
    model="",
    vram_mb=81920,
    mig_instances=(services.MigReport(uuid="sample-mig", profile="1g.10gb", memory_mb=10240),),
)
_SLICE_KINDS = (
    (Slice.Kind.WHOLE, "Whole GPU"),
    (Slice.Kind.SHARED, "Shared, 1/{shares} of a GPU"),
    (Slice.Kind.MIG, "MIG instance, 10 GB of an 80 GB GPU"),
)


def slice_prices(unit: Unit) -> list[SlicePrice]:
    """What each kind of slice costs a renter per hour under the unit's one price per GPU-hour,
    priced by ``services.slice_shapes`` itself on a sample GPU (an instance pays its share of the
    GPU's memory), on demand and interruptible."""
    rows = []
    for kind, label in _SLICE_KINDS:
        cut = copy.copy(unit)
        cut.slicing = kind
        price = services.slice_shapes(cut, _SAMPLE_GPU)[0].price_per_gpu_hour_micros
        rows.append(
            SlicePrice(
                label.format(shares=unit.shared_fraction),
                price,
                interruptible_price(price, unit.interruptible_price_percent),
            )
        )
    return rows


def units_named(reference: str):
    """The units an operator means by ``reference``: its id, or else every unit of that name
    (names are unique per owner only, so a name may match several)."""
    try:
        return Unit.objects.filter(pk=uuid.UUID(reference))
    except ValueError:
        return Unit.objects.filter(name=reference).select_related("owner").order_by("created_at")
