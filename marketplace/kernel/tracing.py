"""A job's trace across processes: submit (web) → placed (worker) → started (the agent's report,
web or connection server). OpenTelemetry's instrumentations trace each request and task; what
ties a job's steps together is its submit's span context, kept in the cache under the job's id
(``trace_remember``) and taken up as the parent of each later step (``trace_step``).

With no exporter configured (OTEL_EXPORTER_OTLP_ENDPOINT unset) both do nothing, not even a
cache read."""

from django.conf import settings
from django.core.cache import cache
from opentelemetry import propagate, trace

KEEP_S = 24 * 3600
_tracer = trace.get_tracer("shedshare")


def _key(job_id) -> str:
    return f"trace:job:{job_id}"


def trace_enabled() -> bool:
    return bool(settings.OTEL_EXPORTER_OTLP_ENDPOINT)


def trace_remember(job_id) -> None:
    """The current span (the submit's request) becomes the parent of the job's later steps."""
    if not settings.OTEL_EXPORTER_OTLP_ENDPOINT:
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if carrier:
        cache.set(_key(job_id), carrier, KEEP_S)


def trace_step(name: str, job_id, **attributes) -> None:
    """Record a step of the job's life as a span under its submit."""
    if not settings.OTEL_EXPORTER_OTLP_ENDPOINT:
        return
    carrier = cache.get(_key(job_id))
    context = propagate.extract(carrier) if carrier else None
    attributes = {"shedshare.job": str(job_id), **{f"shedshare.{k}": str(v) for k, v in attributes.items()}}
    with _tracer.start_as_current_span(name, context=context, attributes=attributes):
        pass
