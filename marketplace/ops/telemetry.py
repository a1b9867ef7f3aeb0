"""Error reports (Sentry) and traces (OpenTelemetry), each switched on by configuration alone:
SENTRY_DSN, and OTEL_EXPORTER_OTLP_ENDPOINT (with the standard OTEL_* variables for the rest).
``start`` runs once per process that serves: the ASGI and WSGI entry points, and each Celery
worker process (marketplace.celery), after any fork, as OpenTelemetry's batch exporter needs."""

import logging
import os

from django.conf import settings

logger = logging.getLogger(__name__)
_started: set[str] = set()


def start(role: str) -> None:
    """``role``: web or worker (the service name's suffix unless OTEL_SERVICE_NAME says)."""
    if role in _started:
        return
    _started.add(role)
    if settings.SENTRY_DSN:
        _sentry()
    if settings.OTEL_EXPORTER_OTLP_ENDPOINT:
        _tracing(role)


def _sentry() -> None:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration

    sentry_sdk.init(
        dsn=settings.SENTRY_DSN,
        environment=settings.SENTRY_ENVIRONMENT,
        traces_sample_rate=settings.SENTRY_TRACES_SAMPLE_RATE,
        integrations=[DjangoIntegration(), CeleryIntegration()],
        send_default_pii=False,  # no renter's address, cookie or body in a report
    )
    logger.info("sentry_started environment=%s", settings.SENTRY_ENVIRONMENT)


def _tracing(role: str) -> None:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or f"shedshare-{role}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    DjangoInstrumentor().instrument()
    CeleryInstrumentor().instrument()
    logger.info("tracing_started service=%s endpoint=%s", name, settings.OTEL_EXPORTER_OTLP_ENDPOINT)
