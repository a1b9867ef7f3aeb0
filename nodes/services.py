import logging
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from decimal import Decimal

import httpx
from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from marketplace.kernel import tokens
from marketplace.kernel.audit import audit_record
from marketplace.kernel.errors import InvalidToken, NotAllowed, StateConflict, TokenExpired, TokenUsed
from nodes import geolocation, ports, streams
from nodes.models import GPU, EnrolmentToken, Isolation, LivenessClock, Slice, Unit

logger = logging.getLogger(__name__)

ENROLMENT_TOKEN_KIND = "shs_enrol"  # noqa: S105 - a token prefix, not a secret
NODE_CREDENTIAL_KIND = "shs_node"


@dataclass(frozen=True)
class MigReport:
    uuid: str
    profile: str
    memory_mb: int


@dataclass(frozen=True)
class GpuReport:
    index: int
    uuid: str
    model: str
    vram_mb: int
    driver_version: str = ""
    cuda_version: str = ""
    mig_mode: bool = False
    healthy: bool = True
    temperature_c: int | None = None
    power_w: int | None = None
    mig_instances: tuple[MigReport, ...] = ()


@transaction.atomic
def unit_register(*, owner, name: str, country: str, subdivision: str = "") -> tuple[Unit, str]:
    """Create a pending unit and return it with its one-time enrolment token."""
    unit = Unit.objects.create(owner=owner, name=name, country=country, subdivision=subdivision)
    audit_record("unit.registered", unit.id, actor=f"user:{owner.pk}", name=name, country=country)
    return unit, enrolment_token_issue(unit=unit)


@transaction.atomic
def enrolment_token_issue(*, unit: Unit) -> str:
    """Issue a fresh enrolment token; any earlier unused token of the unit stops working."""
    now = timezone.now()
    EnrolmentToken.objects.filter(unit=unit, used_at__isnull=True).update(expires_at=now)
    issued = tokens.token_issue(ENROLMENT_TOKEN_KIND)
    EnrolmentToken.objects.create(
        unit=unit,
        lookup=issued.lookup,
        digest=issued.digest,
        expires_at=now + settings.ENROLMENT_TOKEN_TTL,
    )
    return issued.plaintext


def _enrolment_token_find(plaintext: str) -> EnrolmentToken:
    lookup = tokens.token_lookup(plaintext, ENROLMENT_TOKEN_KIND)
    token = EnrolmentToken.objects.select_related("unit").filter(lookup=lookup).first() if lookup else None
    if token is None or not tokens.token_matches(plaintext, token.digest):
        raise InvalidToken("This enrolment token is not valid. Ask the unit's owner for a new one.")
    return token


@transaction.atomic
def unit_enrol(*, token: str, hostname: str, agent_version: str, address: str = "") -> tuple[Unit, str]:
    """Trade a one-time enrolment token for the unit's node credential. ``address`` is the
    agent's public address as the server saw it: evidence for the unit's location."""
    found = _enrolment_token_find(token)
    now = timezone.now()
    if found.used_at is not None:
        raise TokenUsed("This enrolment token has already been used; issue a new one in the portal.")
    if found.expires_at <= now:
        raise TokenExpired("This enrolment token has expired; issue a new one in the portal.")
    unit = found.unit
    if unit.status == Unit.Status.RETIRED:
        raise NotAllowed("This unit is retired and cannot enrol.")
    # Exactly one enrolment may win the token, even when two agents race with it.
    if not EnrolmentToken.objects.filter(pk=found.pk, used_at__isnull=True).update(used_at=now):
        raise TokenUsed("This enrolment token has already been used; issue a new one in the portal.")
    credential = tokens.token_issue(NODE_CREDENTIAL_KIND)
    unit.credential_lookup = credential.lookup
    unit.credential_digest = credential.digest
    unit.enrolled_at = now
    unit.hostname = hostname[:255]
    unit.agent_version = agent_version[:40]
    observed = _address_observe(unit, address, now)
    unit.save(
        update_fields=["credential_lookup", "credential_digest", "enrolled_at", "hostname", "agent_version", *observed]
    )
    audit_record("unit.enrolled", unit.id, actor="agent", hostname=hostname, address=unit.observed_ip or "")
    if observed:
        unit_location_verify(unit=unit, actor="agent")
    return unit, credential.plaintext


def _telemetry_keep(unit: Unit, gpus: list[GpuReport], now: datetime) -> None:
    """The heartbeat's GPU readings, for the portal: latest in the cache, sampled history."""
    readings = streams.telemetry_of(unit.pk, gpus)
    if not readings:
        return
    try:
        streams.telemetry_store(readings, now=now)
    except Exception:  # noqa: BLE001 - a cache outage costs the portal its readings, not the heartbeat
        logger.warning("telemetry_unstored unit=%s", unit.pk, exc_info=True)


def unit_authenticate(*, credential: str) -> Unit | None:
    lookup = tokens.token_lookup(credential, NODE_CREDENTIAL_KIND)
    if lookup is None:
        return None
    unit = Unit.objects.filter(credential_lookup=lookup).exclude(status=Unit.Status.RETIRED).first()
    if unit is None or not tokens.token_matches(credential, unit.credential_digest):
        return None
    return unit


def units_authenticate(credentials: set[str]) -> dict[str, Unit]:
    """``unit_authenticate`` for many credentials in one query: the units of those that hold."""
    lookups = {credential: tokens.token_lookup(credential, NODE_CREDENTIAL_KIND) for credential in credentials}
    units = Unit.objects.filter(credential_lookup__in={lookup for lookup in lookups.values() if lookup})
    by_lookup = {unit.credential_lookup: unit for unit in units.exclude(status=Unit.Status.RETIRED)}
    return {
        credential: unit
        for credential, lookup in lookups.items()
        if (unit := by_lookup.get(lookup)) is not None and tokens.token_matches(credential, unit.credential_digest)
    }


def _inventory_sync(unit: Unit, reports: list[GpuReport], advertise: set[str] | None) -> bool:
    """Bring the unit's GPUs and slices in line with the agent's report and the owner's policy.

    ``advertise`` is the GPUs the agent will take new work on now (backyard limits applied);
    None means every healthy GPU. Returns whether anything changed, so callers know capacity
    may have grown.
    """
    # The slices come with their GPUs (one query, not one per GPU): every full heartbeat runs this.
    known = {gpu.device_uuid: gpu for gpu in unit.gpus.prefetch_related("slices")}
    changed = False
    for report in reports:
        fields = {
            "index": report.index,
            "model": report.model,
            "vram_mb": report.vram_mb,
            "driver_version": report.driver_version,
            "cuda_version": report.cuda_version,
            "mig_mode": report.mig_mode,
            "healthy": report.healthy,
            "present": True,
        }
        # Telemetry (temperature, power) stays out of the GPU rows: nodes/streams.py keeps it.
        gpu = known.pop(report.uuid, None)
        if gpu is None:
            gpu = GPU.objects.create(unit=unit, device_uuid=report.uuid, **fields)
            changed = True
        elif any(getattr(gpu, name) != value for name, value in fields.items()):
            GPU.objects.filter(pk=gpu.pk).update(**fields)
            changed = True
        offered = report.healthy and (advertise is None or report.uuid in advertise)
        changed |= _slices_sync(unit, gpu, report, offered=offered)
    if known:
        GPU.objects.filter(pk__in=[gpu.pk for gpu in known.values()]).update(present=False)
        Slice.objects.filter(gpu__in=known.values()).update(advertised=False)
        changed = True
    return changed


@dataclass(frozen=True)
class SliceShape:
    kind: str
    device_uuid: str
    share_index: int
    isolation: str
    vram_mb: int
    price_per_gpu_hour_micros: int
    milli: int = 1000


def slice_shapes(unit: Unit, report: GpuReport) -> list[SliceShape]:
    """The slices the owner's policy cuts this GPU into. A GPU without MIG instances is sold
    whole even under a MIG policy, rather than not at all."""
    price = unit.price_per_gpu_hour_micros
    if unit.slicing == Slice.Kind.MIG and report.mig_instances:
        return [
            SliceShape(
                Slice.Kind.MIG,
                mig.uuid,
                0,
                Isolation.MIG,
                mig.memory_mb,
                price * mig.memory_mb // report.vram_mb,
                max(1, min(1000, mig.memory_mb * 1000 // report.vram_mb)),
            )
            for mig in report.mig_instances
        ]
    if unit.slicing == Slice.Kind.SHARED:
        parts = unit.shared_fraction
        return [
            SliceShape(
                Slice.Kind.SHARED,
                report.uuid,
                n,
                Isolation.SHARED,
                report.vram_mb // parts,
                price // parts,
                1000 // parts,
            )
            for n in range(parts)
        ]
    return [SliceShape(Slice.Kind.WHOLE, report.uuid, 0, Isolation.GPU, report.vram_mb, price)]


def _slices_sync(unit: Unit, gpu: GPU, report: GpuReport, *, offered: bool) -> bool:
    """Advertise the GPU's slices as the policy cuts them; withdraw slices of any other shape
    (they are kept, not deleted, because past leases refer to them)."""
    existing = {(s.kind, s.device_uuid, s.share_index): s for s in gpu.slices.all()}
    changed = False
    for shape in slice_shapes(unit, report):
        wanted = {
            "unit": unit,
            "isolation": shape.isolation,
            "vram_mb": shape.vram_mb,
            "price_per_gpu_hour_micros": shape.price_per_gpu_hour_micros,
            "milli": shape.milli,
            "advertised": offered,
        }
        current = existing.pop((shape.kind, shape.device_uuid, shape.share_index), None)
        if current is None:
            Slice.objects.create(
                gpu=gpu, kind=shape.kind, device_uuid=shape.device_uuid, share_index=shape.share_index, **wanted
            )
            changed = True
        elif any(getattr(current, name) != value for name, value in wanted.items() if name != "unit"):
            Slice.objects.filter(pk=current.pk).update(**wanted)
            changed = True
    stale = [s.pk for s in existing.values() if s.advertised]
    if stale:
        Slice.objects.filter(pk__in=stale).update(advertised=False)
        changed = True
    return changed


def unit_policy(unit: Unit) -> dict:
    """The owner's policy as the agent needs it to apply backyard limits locally."""
    quiet = None
    if unit.quiet_hours_start is not None and unit.quiet_hours_end is not None:
        quiet = {
            "start": unit.quiet_hours_start.strftime("%H:%M"),
            "end": unit.quiet_hours_end.strftime("%H:%M"),
            "time_zone": unit.time_zone,
            "max_gpus": unit.quiet_hours_max_gpus,
            "power_cap_w": unit.quiet_hours_power_cap_w,
        }
    budget = unit.power_budget_kw
    return {
        "slicing": unit.slicing,
        "shared_fraction": unit.shared_fraction,
        "isolation_levels": unit.isolation_levels,
        "quiet_hours": quiet,
        "power_budget_w": None if budget is None else int(budget * 1000),
        "thermal_stop_c": unit.thermal_stop_c,
        "thermal_resume_c": unit.thermal_resume_c,
    }


POLICY_FIELDS = (
    "price_per_gpu_hour_micros", "isolation_levels", "workload_classes", "renters_accepted",
    "interruptible_price_percent", "max_job_duration_s", "availability",
    # Slicing and backyard limits: the agent reads them with its next heartbeat.
    "slicing", "shared_fraction", "time_zone", "quiet_hours_start", "quiet_hours_end", "quiet_hours_max_gpus",
    "quiet_hours_power_cap_w", "power_budget_kw", "thermal_stop_c", "thermal_resume_c",
)  # fmt: skip


@transaction.atomic
def unit_policy_update(*, unit: Unit, actor: str, **policy) -> Unit:
    """Change the owner's placement policy: checked by ``Unit.full_clean`` (ValidationError),
    written alone so a concurrent heartbeat's fields are not overwritten, and announced to
    placement by a new capacity version. Slice prices follow at the next heartbeat."""
    unknown = set(policy) - set(POLICY_FIELDS)
    if unknown:
        raise TypeError(f"not policy fields: {sorted(unknown)}")
    for field, value in policy.items():
        setattr(unit, field, value)
    unit.full_clean()
    unit.save(update_fields=list(policy))
    units_capacity_changed([unit.pk])
    audit_record("unit.policy_changed", unit.id, actor=actor, **{f: _audit_value(getattr(unit, f)) for f in policy})
    return unit


@transaction.atomic
def unit_staff_edit(*, unit: Unit, changed: list[str], previous: dict, actor: str) -> Unit:
    """An operator's edit of a unit in the admin, already set on ``unit``: the owner's policy goes
    through ``unit_policy_update`` (checked, audited), a new declared location through
    ``unit_location_declared`` (evidence re-checked), anything else is written alone and audited;
    placement hears of it all by a new capacity version."""
    policy = {field: getattr(unit, field) for field in changed if field in POLICY_FIELDS}
    others = [field for field in changed if field not in POLICY_FIELDS]
    if others:
        unit.save(update_fields=others)
        audit_record("unit.edited_by_staff", unit.id, actor=actor, fields=sorted(others))
        units_capacity_changed([unit.pk])
    if policy:
        unit_policy_update(unit=unit, actor=actor, **policy)
    if {"country", "subdivision"} & set(others):
        location = (str(previous.get("country") or ""), previous.get("subdivision") or "")
        unit_location_declared(unit=unit, previous=location, actor=actor)
    return unit


def _audit_value(value):
    """Policy values as the audit row's JSON can hold them: times as "HH:MM", kW as a string."""
    if isinstance(value, time):
        return value.strftime("%H:%M")
    if isinstance(value, Decimal):
        return str(value)
    return value


DRAINABLE = (Unit.Status.ONLINE, Unit.Status.SUSPECT)


@transaction.atomic
def unit_drain(*, unit: Unit, actor: str) -> Unit:
    """Take no new work on the unit, for maintenance; running jobs go on to their end. The drain
    is remembered (``drain_requested``) until the owner resumes, whatever liveness does meanwhile.
    Draining a unit that is draining already changes nothing."""
    previous = unit.status
    drained = Unit.objects.filter(pk=unit.pk, status__in=DRAINABLE, drain_requested=False).update(
        drain_requested=True,
        status=Case(When(status=Unit.Status.ONLINE, then=Value(Unit.Status.DRAINING)), default=F("status")),
    )
    unit.refresh_from_db(fields=["status", "drain_requested"])
    if not drained:
        if unit.drain_requested:
            return unit
        raise StateConflict(f"Only an online unit can be drained; this one is {unit.get_status_display().lower()}.")
    units_capacity_changed([unit.pk])
    audit_record("unit.drain_started", unit.id, actor=actor, previous=previous)
    return unit


@transaction.atomic
def unit_resume(*, unit: Unit, actor: str) -> Unit:
    """Take work again after a drain. The liveness sweep moves the unit on from online as usual
    if its agent has stopped heartbeating meanwhile. Resuming a unit not draining changes nothing."""
    resumed = Unit.objects.filter(pk=unit.pk, drain_requested=True).update(
        drain_requested=False,
        status=Case(When(status=Unit.Status.DRAINING, then=Value(Unit.Status.ONLINE)), default=F("status")),
    )
    unit.refresh_from_db(fields=["status", "drain_requested"])
    if not resumed:
        return unit
    units_capacity_changed([unit.pk])
    audit_record("unit.drain_ended", unit.id, actor=actor)
    return unit


@transaction.atomic
def unit_heartbeat(
    *,
    unit: Unit,
    gpus: list[GpuReport],
    agent_version: str = "",
    advertise: list[str] | None = None,
    limits: dict | None = None,
    address: str = "",
    country: str | None = None,
) -> bool:
    """Record that the unit is alive, what it has and what it offers now, the public address
    it called from and the country its agent is configured for (None: none). Returns whether
    capacity may have grown."""
    now = timezone.now()
    was = unit.status
    if was in (Unit.Status.PENDING, Unit.Status.SUSPECT, Unit.Status.OFFLINE):
        # Decided in the database, not from the copy loaded for this request, so an owner's
        # drain made meanwhile is kept: a drained unit comes back draining.
        back = Case(When(drain_requested=True, then=Value(Unit.Status.DRAINING)), default=Value(Unit.Status.ONLINE))
        if Unit.objects.filter(pk=unit.pk, status=was).update(status=back):
            unit.refresh_from_db(fields=["status", "drain_requested"])
            audit_record("unit.came_online", unit.id, actor="agent", previous=was, status=unit.status)
    unit.last_heartbeat_at = now
    if agent_version:
        unit.agent_version = agent_version[:40]
    fields = ["last_heartbeat_at", "agent_version"]
    if limits is not None and limits != unit.limits:
        unit.limits = limits
        fields.append("limits")
        audit_record("unit.limits_changed", unit.id, actor="agent", limits=limits)
    agent_country = country or ""
    if agent_country != unit.agent_country:
        audit_record(
            "unit.agent_country_reported", unit.id, actor="agent", country=agent_country,
            previous=unit.agent_country, declared=unit.country.code,
        )  # fmt: skip
        unit.agent_country = agent_country
        fields.append("agent_country")
    observed = _address_observe(unit, address, now)
    unit.save(update_fields=fields + observed)
    was_verified = unit.location_verified
    if observed or "agent_country" in fields:
        unit_location_verify(unit=unit, actor="agent")  # and the jobs there held to their rules again
    became_verified = unit.location_verified and not was_verified
    inventory_changed = _inventory_sync(unit, gpus, None if advertise is None else set(advertise))
    _telemetry_keep(unit, gpus, now)
    changed = inventory_changed or was != unit.status or "agent_country" in fields
    if changed:
        units_capacity_changed([unit.pk])
    return changed or became_verified


def _address_observe(unit: Unit, address: str, now: datetime) -> list[str]:
    """Take the agent's public address as location evidence; returns the fields it changed.

    Heartbeats arrive thousands of times a second at scale, so the address is looked up only
    when it differs from the last one. A private or unknown address is no evidence: the
    observed country becomes "" and verification rests on an attestation alone.
    """
    address = geolocation.address_normalise(address)
    if not address or address == unit.observed_ip:
        return []
    country = geolocation.country_of(address)
    if country != unit.observed_country:
        audit_record(
            "unit.location_observed", unit.id, actor="agent", address=address, country=country,
            previous=unit.observed_country,
        )  # fmt: skip
    unit.observed_ip, unit.observed_country, unit.observed_at = address, country, now
    return ["observed_ip", "observed_country", "observed_at"]


def location_attested(unit: Unit) -> bool:
    """Whether an operator's attestation vouches for the location the unit declares now; a
    changed declaration leaves the old attestation on record but without effect."""
    return (
        unit.attested_at is not None
        and unit.attested_country == unit.country.code
        and unit.attested_subdivision == unit.subdivision
    )


def location_mismatch(unit: Unit) -> bool:
    return bool(unit.observed_country) and unit.observed_country != unit.country.code


def location_disputed(unit: Unit) -> bool:
    """Whether evidence puts the unit in another country than it declares: such a unit takes
    and keeps no job restricted to some jurisdictions (placement's ``Profile.disputed``)."""
    return location_mismatch(unit)


def location_evidence(unit: Unit) -> list[str]:
    """What vouches for the declared location now: "address", "attestation", both or neither."""
    if location_mismatch(unit):
        return []
    return [
        name
        for name, holds in (("address", bool(unit.observed_country)), ("attestation", location_attested(unit)))
        if holds
    ]


@transaction.atomic(savepoint=False)  # no savepoint: this runs inside every heartbeat that moves address
def unit_location_verify(*, unit: Unit, actor: str = "system") -> bool:
    """Recompute whether the unit's declared location is verified, and return it.

    Verified: the evidence does not contradict the declaration, and either the agent's address
    is in the declared country or an attestation vouches for the declared country and
    subdivision. A mismatch unverifies the unit whatever was attested. Placement sees the
    change at once because the capacity version moves with it.
    """
    evidence = location_evidence(unit)
    verified = bool(evidence)
    if location_mismatch(unit):
        audit_record(
            "unit.location_mismatch", unit.id, actor=actor, declared=unit.country.code,
            subdivision=unit.subdivision, observed=unit.observed_country, address=unit.observed_ip or "",
        )  # fmt: skip
    # Placement reads the evidence too (a disputed location), not only the verdict: it looks again.
    units_capacity_changed([unit.pk])
    if verified != unit.location_verified:
        unit.location_verified = verified
        Unit.objects.filter(pk=unit.pk).update(location_verified=verified)
        audit_record(
            "unit.location_verified" if verified else "unit.location_unverified", unit.id, actor=actor,
            country=unit.country.code, subdivision=unit.subdivision, evidence=evidence,
        )  # fmt: skip
    ports.location_changed(unit=unit, actor=actor)  # what runs there is held to its rules again
    return verified


@transaction.atomic
def unit_location_declare(*, unit: Unit, country: str, subdivision: str = "", actor: str) -> Unit:
    """The owner declares where the unit is. An earlier attestation no longer matches a new
    declaration, so the unit stays verified only if its address agrees."""
    if subdivision and not subdivision.startswith(f"{country}-"):
        raise ValueError(f"The subdivision {subdivision} is not in {country}.")
    previous = (unit.country.code, unit.subdivision)
    unit.country, unit.subdivision = country, subdivision
    unit.save(update_fields=["country", "subdivision"])
    if previous != (country, subdivision):
        unit_location_declared(unit=unit, previous=previous, actor=actor)
    return unit


def unit_location_declared(*, unit: Unit, previous: tuple[str, str], actor: str) -> None:
    """After the declared location changed (here or in the admin): audit it and re-verify."""
    audit_record(
        "unit.location_declared", unit.id, actor=actor, country=unit.country.code, subdivision=unit.subdivision,
        previous_country=previous[0], previous_subdivision=previous[1],
    )  # fmt: skip
    units_capacity_changed([unit.pk])
    unit_location_verify(unit=unit, actor=actor)


@transaction.atomic
def unit_location_attest(*, unit: Unit, by) -> Unit:
    """An operator vouches for the location the unit declares now."""
    unit.attested_country, unit.attested_subdivision = unit.country.code, unit.subdivision
    unit.attested_by, unit.attested_at = by, timezone.now()
    unit.save(update_fields=["attested_country", "attested_subdivision", "attested_by", "attested_at"])
    units_capacity_changed([unit.pk])  # placement reads whether the subdivision is attested
    audit_record(
        "unit.location_attested", unit.id, actor=f"user:{by.pk}", country=unit.country.code,
        subdivision=unit.subdivision,
    )  # fmt: skip
    unit_location_verify(unit=unit, actor=f"user:{by.pk}")
    return unit


@transaction.atomic
def unit_location_attestation_revoke(*, unit: Unit, by) -> Unit:
    """Withdraw an operator's attestation; the unit stays verified only if its address agrees."""
    if unit.attested_at is None:
        return unit
    revoked = {"country": unit.attested_country, "subdivision": unit.attested_subdivision}
    unit.attested_country, unit.attested_subdivision, unit.attested_by, unit.attested_at = "", "", None, None
    unit.save(update_fields=["attested_country", "attested_subdivision", "attested_by", "attested_at"])
    units_capacity_changed([unit.pk])  # placement reads whether the subdivision is attested
    audit_record("unit.location_attestation_revoked", unit.id, actor=f"user:{by.pk}", **revoked)
    unit_location_verify(unit=unit, actor=f"user:{by.pk}")
    return unit


def units_capacity_changed(unit_ids, *, agents_know: bool = False) -> None:
    """Tell placement these units' capacity or policy changed, so it reads them again, and
    their agents' streams, so they push the policy and status at once; unless the change is
    the agent's own report (``agents_know``: a job it says has ended frees its GPUs, and it
    has nothing new to hear)."""
    unit_ids = list(unit_ids)
    Unit.objects.filter(pk__in=unit_ids).update(
        capacity_version=F("capacity_version") + 1, capacity_changed_at=timezone.now()
    )
    if not agents_know:
        streams.nudge(unit_ids)


def gpu_report(data: dict) -> GpuReport:
    migs = tuple(MigReport(**mig) for mig in data.get("mig_instances", ()))
    power = data.get("power_w")
    return GpuReport(**{**data, "mig_instances": migs, "power_w": None if power is None else round(power)})


def ingest_reachable() -> bool:
    """Whether agents could reach the server just now: LIVENESS_PROBE_URL answers. A connection
    failure or a 5xx is an outage; any other answer means the web server is up (a 4xx is a
    misconfigured probe, logged, and must not hold verdicts for ever). No URL: assumed up."""
    if not settings.LIVENESS_PROBE_URL:
        return True
    try:
        status = httpx.get(settings.LIVENESS_PROBE_URL, timeout=2.0).status_code
    except httpx.HTTPError as exc:
        logger.warning("liveness_probe_failed url=%s error=%s", settings.LIVENESS_PROBE_URL, type(exc).__name__)
        return False
    if status != 200:
        logger.error("liveness_probe_answered url=%s status=%s", settings.LIVENESS_PROBE_URL, status)
    return status < 500


def liveness_resumed_at(*, now: datetime, ingest_up: bool = True) -> datetime | None:
    """Record this sweep, and return when judging last resumed after the server's own outage:
    a gap of more than LIVENESS_OUTAGE_AFTER since the previous sweep means the server was away
    (its database, broker or workers), and ``ingest_up`` false means the web server is away now;
    either way heartbeats could not have been stored or judged. Units get the full grace again
    from that moment. None: no outage seen."""
    with transaction.atomic():
        clock = LivenessClock.objects.select_for_update().filter(pk=1).first()
        if clock is None:
            resumed_at = None if ingest_up else now
            LivenessClock.objects.get_or_create(pk=1, defaults={"swept_at": now, "resumed_at": resumed_at})
            return resumed_at
        if not ingest_up:
            clock.resumed_at = now
            logger.warning("liveness_held: agents cannot reach the web server, so silence proves nothing")
        elif now - clock.swept_at > settings.LIVENESS_OUTAGE_AFTER:
            clock.resumed_at = now
            logger.warning("liveness_resumed after %.0f s without a sweep: units get a fresh grace",
                           (now - clock.swept_at).total_seconds())  # fmt: skip
        clock.swept_at = max(clock.swept_at, now)
        clock.save(update_fields=["swept_at", "resumed_at"])
        return clock.resumed_at


def units_mark_unresponsive(*, now: datetime, ingest_up: bool = True) -> list[Unit]:
    """Move units that stopped heartbeating to suspect or offline; return those now offline.
    Silence counts from the last heartbeat, or from the end of the server's own outage if later,
    plus the Retry-After the agents were given meanwhile (OUTAGE_RETRY_AFTER_S)."""
    alive = (Unit.Status.ONLINE, Unit.Status.DRAINING)
    suspect_before = now - settings.UNIT_SUSPECT_AFTER
    offline_before = now - settings.UNIT_OFFLINE_AFTER
    resumed_at = liveness_resumed_at(now=now, ingest_up=ingest_up)
    if resumed_at is not None:
        # During the outage the agents were told to wait this long before they try again.
        resumed_at += timedelta(seconds=settings.OUTAGE_RETRY_AFTER_S)
    if resumed_at is not None and resumed_at >= suspect_before:
        return []
    # A unit is seen at its last stored heartbeat, or while a connection server that renews its
    # lease holds its stream (streams.silent_since).
    for unit in Unit.objects.filter(streams.silent_since(suspect_before), status__in=alive):
        if Unit.objects.filter(streams.silent_since(suspect_before), pk=unit.pk, status=unit.status).update(
            status=Unit.Status.SUSPECT, capacity_version=F("capacity_version") + 1, capacity_changed_at=now
        ):
            audit_record("unit.went_suspect", unit.id, last_heartbeat=unit.last_heartbeat_at.isoformat())
            streams.nudge([unit.pk])  # a stream still open hears it, and its next heartbeat counts
    gone = []
    if resumed_at is not None and resumed_at >= offline_before:
        return gone
    candidates = Unit.objects.filter(streams.silent_since(offline_before), status=Unit.Status.SUSPECT)
    for unit in candidates:
        if Unit.objects.filter(streams.silent_since(offline_before), pk=unit.pk, status=Unit.Status.SUSPECT).update(
            status=Unit.Status.OFFLINE, capacity_version=F("capacity_version") + 1, capacity_changed_at=now
        ):
            audit_record("unit.went_offline", unit.id, last_heartbeat=unit.last_heartbeat_at.isoformat())
            gone.append(unit)
    return gone


@transaction.atomic
def unit_implausible_report(*, unit_id, reason: str, now: datetime) -> bool:
    """Count an implausible report from the unit's agent (usage it cannot have measured). The
    USAGE_REVIEW_AFTER-th within USAGE_REVIEW_WINDOW of the first puts the unit under review.
    Returns whether the unit is under review now."""
    window_open = Q(implausible_since__gte=now - settings.USAGE_REVIEW_WINDOW)
    Unit.objects.filter(pk=unit_id).update(
        implausible_reports=Case(When(window_open, then=F("implausible_reports") + 1), default=Value(1)),
        implausible_since=Case(When(window_open, then=F("implausible_since")), default=Value(now)),
    )
    count, since = Unit.objects.filter(pk=unit_id).values_list("implausible_reports", "implausible_since").get()
    if count < settings.USAGE_REVIEW_AFTER:
        return False
    why = f"{count} implausible usage reports since {since:%Y-%m-%d %H:%M} UTC, the last: {reason}"
    unit_review_start(unit_id=unit_id, reason=why, actor="usage", now=now)
    return True


@transaction.atomic
def unit_review_start(*, unit_id, reason: str, actor: str, now: datetime) -> bool:
    """Put the unit under review: placement gives it no new job until staff clear it. Running
    jobs go on. Returns whether it was not under review before."""
    if not Unit.objects.filter(pk=unit_id, review_since__isnull=True).update(
        review_since=now, review_reason=reason[:255]
    ):
        return False
    units_capacity_changed([unit_id])
    audit_record("unit.review_started", unit_id, actor=actor, reason=reason)
    return True


@transaction.atomic
def unit_review_clear(*, unit: Unit, actor: str) -> bool:
    """Staff looked into the unit: it takes jobs again, and its count of implausible reports
    starts afresh. Returns whether it was under review."""
    cleared = Unit.objects.filter(pk=unit.pk, review_since__isnull=False).update(
        review_since=None, review_reason="", implausible_reports=0, implausible_since=None
    )
    unit.refresh_from_db(fields=["review_since", "review_reason", "implausible_reports", "implausible_since"])
    if cleared:
        units_capacity_changed([unit.pk])
        audit_record("unit.review_cleared", unit.pk, actor=actor)
    return bool(cleared)
