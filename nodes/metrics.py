"""Units as Prometheus reads them at scrape time (``/metrics``): how many are in each status,
how many hold a stream, and how long since the stalest online unit was heard from."""

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db.models import Count, Max, Min
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from nodes.models import LivenessClock, Unit

_NEVER = datetime(2000, 1, 1, tzinfo=UTC)


def collect():
    now = timezone.now()
    units = GaugeMetricFamily("shedshare_units", "Units by status.", labels=["status"])
    counts = dict(Unit.objects.values_list("status").annotate(n=Count("pk")))
    for status in Unit.Status.values:
        units.add_metric([status], counts.get(status, 0))
    yield units

    streams = GaugeMetricFamily(
        "shedshare_units_connected", "Units holding a stream to a connection server that renews its lease."
    )
    fresh = now - timedelta(seconds=3 * settings.STREAM_LEASE_RENEW_S)
    streams.add_metric([], Unit.objects.filter(stream_server__renewed_at__gte=fresh).count())
    yield streams

    lag = GaugeMetricFamily(
        "shedshare_units_heartbeat_lag_seconds",
        "Since the stalest online unit was last seen alive (its heartbeat, or its stream's server lease).",
    )
    seen = Greatest(Coalesce("last_heartbeat_at", _NEVER), Coalesce("stream_server__renewed_at", _NEVER))
    stalest = Unit.objects.filter(status=Unit.Status.ONLINE).aggregate(at=Min(seen))["at"]
    lag.add_metric([], (now - stalest).total_seconds() if stalest else 0)
    yield lag

    sweep = GaugeMetricFamily(
        "shedshare_liveness_sweep_age_seconds", "Since the liveness sweep last ran (the workers' heartbeat)."
    )
    swept = LivenessClock.objects.aggregate(at=Max("swept_at"))["at"]
    sweep.add_metric([], (now - swept).total_seconds() if swept else float("inf"))
    yield sweep
