"""What the agent streams keep in the database and the cache: which connection server holds
which unit, the nudges that tell it to push something, and the GPU telemetry the streams carry.

A heartbeat over a stream that changes nothing the marketplace decides on writes no row: the
unit counts as seen while its connection server renews one lease row (``StreamServer``) for all
the units it holds; telemetry goes to the cache (latest readings) and to one sampled history row
per unit now and then. The connection server itself is ``marketplace/jobs/agent_stream/``.
"""

import logging
import threading
from datetime import datetime

from django.conf import settings
from django.core.cache import cache
from django.db import connection as db_connection
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from marketplace.kernel.audit import audit_record
from nodes.models import StreamServer, Unit, UnitNudge, UnitTelemetry

logger = logging.getLogger(__name__)

ALIVE = (Unit.Status.ONLINE, Unit.Status.DRAINING)


NUDGE_CHANNEL = "shedshare_nudges"  # PostgreSQL's NOTIFY channel that wakes the connection servers


def nudge(unit_ids, *, kind: str = UnitNudge.Kind.LOOK, connection: str = "") -> list[int]:
    """Tell the units' connection servers to read these units again and push what changed.
    Written in the caller's transaction, so a nudge is seen only once what it announces is; on
    PostgreSQL a NOTIFY, delivered at the commit, wakes the servers at once. Returns the
    nudges' ids."""
    rows = [UnitNudge(unit_id=unit_id, kind=kind, connection=connection) for unit_id in dict.fromkeys(unit_ids)]
    if rows:
        UnitNudge.objects.bulk_create(rows)
        if db_connection.vendor == "postgresql":
            with db_connection.cursor() as cursor:
                cursor.execute(f"NOTIFY {NUDGE_CHANNEL}")
    return [row.pk for row in rows]


def nudges_listen(woken, stopping: threading.Event) -> None:
    """On PostgreSQL, call ``woken()`` whenever nudges commit (LISTEN on a connection of its
    own), and once after each (re)connection, until ``stopping`` is set; reconnects after an
    outage. Returns at once elsewhere: the servers poll the nudges alone."""
    if db_connection.vendor != "postgresql":
        return
    import psycopg

    db = settings.DATABASES["default"]
    params = {"dbname": db["NAME"], "user": db.get("USER"), "password": db.get("PASSWORD"), "host": db.get("HOST"),
              "port": db.get("PORT"), "connect_timeout": 3}  # fmt: skip
    while not stopping.is_set():
        try:
            with psycopg.connect(**{k: v for k, v in params.items() if v}, autocommit=True) as listener:
                listener.execute(f"LISTEN {NUDGE_CHANNEL}")
                woken()  # what committed while no one listened
                while not stopping.is_set():
                    for _ in listener.notifies(timeout=1.0):
                        woken()
        except Exception:  # noqa: BLE001 - the database is away: the servers poll meanwhile
            logger.warning("nudges_unheard: LISTEN failed, retrying", exc_info=True)
            stopping.wait(1.0)


def nudges_after(last_id: int, *, limit: int = 1000) -> list[tuple[int, str, str, str]]:
    """The nudges after ``last_id``, oldest first: (id, unit id, kind, connection)."""
    rows = UnitNudge.objects.filter(pk__gt=last_id).order_by("pk")[:limit]
    return [(pk, str(unit_id), kind, connection) for pk, unit_id, kind, connection in rows.values_list(
        "pk", "unit_id", "kind", "connection")]  # fmt: skip


def nudges_last_id() -> int:
    return UnitNudge.objects.order_by("-pk").values_list("pk", flat=True).first() or 0


def server_renew(server_id: str, *, now: datetime, relay_address: str = "") -> None:
    """Renew the connection server's lease (one row for all the units it holds), with where the
    relay's peers reach it and where it runs (RELAY_LOCATION)."""
    fields = {"renewed_at": now, "relay_address": relay_address, "location": settings.RELAY_LOCATION}
    if not StreamServer.objects.filter(pk=server_id).update(**fields):
        StreamServer.objects.update_or_create(pk=server_id, defaults=fields)


def prune(*, now: datetime) -> None:
    UnitNudge.objects.filter(created_at__lt=now - settings.STREAM_NUDGE_KEEP).delete()
    StreamServer.objects.filter(renewed_at__lt=now - settings.UNIT_OFFLINE_AFTER * 2).delete()


@transaction.atomic
def stream_opened(*, unit_id: str, server_id: str, connection: str) -> int:
    """Record that the unit's stream is held here now; older streams of the unit, here or on
    another server, close when they read the "connected" nudge. Returns that nudge's id: a
    stream closes only for a "connected" nudge after its own (one before it, read late, came
    from an older stream)."""
    Unit.objects.filter(pk=unit_id).update(stream_server_id=server_id, stream_connection=connection)
    [nudge_id] = nudge([unit_id], kind=UnitNudge.Kind.CONNECTED, connection=connection)
    return nudge_id


@transaction.atomic
def stream_lost(*, unit_id: str, connection: str, now: datetime, why: str) -> bool:
    """The unit's stream dropped (the agent, its host or its network went away): the unit goes
    suspect at once, and offline after UNIT_OFFLINE_AFTER from now unless it comes back. Only
    if this connection is still the unit's: a newer one has taken over otherwise. Returns
    whether the unit went suspect."""
    mine = Unit.objects.filter(pk=unit_id, stream_connection=connection)
    status = mine.values_list("status", flat=True).first()
    if status is None:
        return False
    suspect = status in ALIVE
    mine.update(
        stream_server=None,
        stream_connection="",
        last_heartbeat_at=now,
        status=Case(When(status__in=ALIVE, then=Value(Unit.Status.SUSPECT)), default=F("status")),
        capacity_version=F("capacity_version") + 1,
        capacity_changed_at=now,
    )
    if suspect:
        audit_record("unit.went_suspect", unit_id, last_heartbeat=now.isoformat(), stream=why)
    return suspect


def seen_at(heartbeat: datetime | None, streamed: datetime | None) -> datetime | None:
    """When the unit was last seen alive: its last stored heartbeat, or the last lease renewal
    of the connection server holding its stream, whichever is later."""
    return max((at for at in (heartbeat, streamed) if at is not None), default=None)


def silent_since(before: datetime):
    """Units with no sign of life since ``before``: no heartbeat stored since, and no stream
    held by a connection server that renewed its lease since."""
    return Q(last_heartbeat_at__lt=before) & ~Q(stream_server__renewed_at__gte=before)  # no server row: silent


def telemetry_key(unit_id) -> str:
    return f"telemetry:{unit_id}"


def telemetry_store(readings: dict[str, dict], *, now: datetime, sample: set[str] | None = None) -> None:
    """Keep the units' latest GPU readings (unit id -> {"at", "gpus": [...]}) in the cache, and
    those of ``sample`` in the history as well (None: those whose last history row is older than
    STREAM_TELEMETRY_SAMPLE_S, as the cache remembers)."""
    cache.set_many({telemetry_key(unit_id): reading for unit_id, reading in readings.items()},
                   timeout=settings.STREAM_TELEMETRY_TTL_S)  # fmt: skip
    if sample is None:
        every = settings.STREAM_TELEMETRY_SAMPLE_S
        sample = {unit_id for unit_id in readings if cache.add(f"telemetry-sampled:{unit_id}", 1, timeout=every)}
    rows = [UnitTelemetry(unit_id=unit_id, at=now, gpus=readings[unit_id]["gpus"]) for unit_id in sample]
    if rows:
        UnitTelemetry.objects.bulk_create(rows)


def telemetry_of(unit_id, gpus) -> dict[str, dict]:
    """One unit's readings from its GPU reports (objects with uuid, temperature_c, power_w)."""
    readings = [{"uuid": gpu.uuid, "temperature_c": gpu.temperature_c, "power_w": gpu.power_w} for gpu in gpus]
    if all(r["temperature_c"] is None and r["power_w"] is None for r in readings):
        return {}
    return {str(unit_id): {"at": timezone.now().isoformat(), "gpus": readings}}


def telemetry_latest(unit_ids) -> dict[str, dict]:
    """The latest readings of these units that a stream brought (unit id -> {"at", "gpus"})."""
    keys = {telemetry_key(unit_id): str(unit_id) for unit_id in unit_ids}
    try:
        found = cache.get_many(list(keys))
    except Exception:  # noqa: BLE001 - a cache outage hides the readings, nothing more
        logger.warning("telemetry_unavailable", exc_info=True)
        return {}
    return {keys[key]: value for key, value in found.items()}
