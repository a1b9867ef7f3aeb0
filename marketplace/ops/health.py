"""Readiness: ``/readyz`` answers 200 when this process can do its work (the database, the cache,
the broker answer, and the workers' heartbeat is fresh) and 503 with ``Retry-After`` when a part
is down, naming it. Liveness (``/healthz``, ``marketplace.kernel.health``) checks nothing behind
the process, so an orchestrator restarts only what restarting can mend.

``/readyz?scope=serving`` leaves the workers out: the probe a load balancer uses to take a web
process out of rotation, which a worker outage should not do (the API still takes jobs and
answers; placement catches up when the workers return). The checks are django-health-check's
(the database, the cache) plus two of ours below."""

import dataclasses
import datetime

from django.conf import settings
from django.utils import timezone
from health_check import checks
from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable
from health_check.views import HealthCheckView


@dataclasses.dataclass
class Broker(HealthCheck):
    """The Celery broker takes a connection (the file-system broker of the embedded default too)."""

    timeout: datetime.timedelta = dataclasses.field(default=datetime.timedelta(seconds=3), repr=False)

    def run(self) -> None:
        from marketplace.celery import app

        try:
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=self.timeout.total_seconds())
        except Exception as error:  # noqa: BLE001 - kombu raises its transports' own errors
            raise ServiceUnavailable(f"broker unreachable: {type(error).__name__}") from error


@dataclasses.dataclass
class Workers(HealthCheck):
    """The workers' heartbeat: the liveness sweep, which beat schedules every LIVENESS_SWEEP_S
    and a worker runs, ran lately. Stale, something among beat, broker and workers is stopped."""

    def run(self) -> None:
        from nodes.models import LivenessClock

        swept = LivenessClock.objects.order_by("-swept_at").values_list("swept_at", flat=True).first()
        if swept is None:
            raise ServiceUnavailable("no worker has run the liveness sweep yet")
        age = (timezone.now() - swept).total_seconds()
        if age > settings.READINESS_WORKERS_STALE_S:
            raise ServiceUnavailable(f"the workers' last liveness sweep was {age:.0f} s ago")


SERVING = (checks.Database, checks.Cache, Broker)


class Readiness(HealthCheckView):
    """django-health-check's view, answering 503 (with Retry-After) rather than 500 when a check
    fails, and JSON unless asked otherwise (``?format=text``)."""

    def get_checks(self):
        chosen = SERVING if self.request.GET.get("scope") == "serving" else (*SERVING, Workers)
        return (check() for check in chosen)

    async def get(self, request, *args, **kwargs):
        if "format" not in request.GET:
            request.GET = request.GET.copy()
            request.GET["format"] = "json"
        response = await super().get(request, *args, **kwargs)
        if response.status_code == 500:
            response.status_code = 503
            response.reason_phrase = "Service Unavailable"
            response["Retry-After"] = str(settings.OUTAGE_RETRY_AFTER_S)
        return response


readyz = Readiness.as_view()
