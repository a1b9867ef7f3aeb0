"""``/metrics``: Prometheus's text format, for the operator's network or a token.

Two kinds of figure. Counters and histograms that processes update as things happen
(``marketplace.kernel.metrics``): with ``PROMETHEUS_MULTIPROC_DIR`` set, every gunicorn worker
and Celery child writes its values to files there and this view sums them, so any one worker
answers for its whole host; without it, this process's own. And gauges each app reads from the
database at scrape time (``<app>.metrics.collect``): the queue, the units, money's backlogs. Those
are the same whichever process answers, so a dashboard takes ``max`` of them across pods.

Who may read it: a request with ``Authorization: Bearer <METRICS_TOKEN>``, or one from an address
in METRICS_ALLOWED_NETWORKS that did not come through a proxy (no ``X-Forwarded-For``: a public
request reaching the web server through the ingress comes from the ingress's private address,
and must not pass for the operator's own). Anyone else gets a 404, as for a page that is not
there."""

import hmac
import ipaddress
import logging
import os

from django.conf import settings
from django.http import Http404, HttpResponse
from django.views.decorators.cache import never_cache
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from billing import metrics as billing_metrics
from marketplace.jobs import metrics as jobs_metrics
from nodes import metrics as nodes_metrics

logger = logging.getLogger(__name__)

COLLECTORS = {"jobs": jobs_metrics.collect, "nodes": nodes_metrics.collect, "billing": billing_metrics.collect}


class _Database:
    """Every app's scrape-time figures; an app whose read fails (the database down) is left out
    and counted in ``shedshare_scrape_errors`` rather than failing the whole scrape."""

    def collect(self):
        errors = GaugeMetricFamily(
            "shedshare_scrape_errors", "Apps whose figures could not be read at this scrape.", labels=["app"]
        )
        for app, collect in COLLECTORS.items():
            try:
                families = list(collect())
            except Exception:  # noqa: BLE001 - an outage must not hide the process's own metrics
                logger.warning("metrics_collect_failed app=%s", app, exc_info=True)
                errors.add_metric([app], 1)
                continue
            errors.add_metric([app], 0)
            yield from families
        yield errors


def registry() -> CollectorRegistry:
    """The processes' counters (summed over the host's processes when multi-process) plus the
    apps' scrape-time figures."""
    combined = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(combined)
    else:
        combined.register(_Process())
    combined.register(_Database())
    return combined


class _Process:
    def collect(self):
        yield from REGISTRY.collect()


def allowed(request) -> bool:
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
    if "x-forwarded-for" in request.headers:
        return False
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in settings.METRICS_ALLOWED_NETWORKS)


@never_cache
def metrics_view(request) -> HttpResponse:
    if not allowed(request):
        raise Http404
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
