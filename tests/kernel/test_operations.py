"""The operator's endpoints and signals: /healthz, /readyz, /metrics (who may read it, and the
figures it reads), request ids, and log lines that carry the ids bound where they were written."""

import json
import logging
from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from marketplace.jobs.models import Job
from marketplace.kernel import metrics
from marketplace.kernel.logcontext import ContextFilter, log_context, log_fields
from marketplace.kernel.middleware import route_label
from nodes.models import LivenessClock, Unit
from tests.conftest import job_make, unit_online

pytestmark = pytest.mark.django_db


def scrape(client, **extra) -> dict:
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1", **extra)
    assert response.status_code == 200, response.content
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def test_liveness_answers_with_nothing_behind_it(client):
    response = client.get("/healthz")
    assert (response.status_code, response.content) == (200, b"ok\n")


@pytest.mark.django_db(transaction=True)  # the checks run in threads of their own: committed rows only
def test_readiness_is_ok_when_every_part_answers_and_the_workers_swept_lately(client):
    LivenessClock.objects.create(swept_at=timezone.now())
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body.values()) == {"OK"}
    assert {name.split("(")[0] for name in body} == {"Database", "Cache", "Broker", "Workers"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("swept", [None, timedelta(hours=1)], ids=["never", "an-hour-ago"])
def test_readiness_is_503_with_retry_after_when_the_workers_stopped(client, settings, swept):
    if swept is not None:
        LivenessClock.objects.create(swept_at=timezone.now() - swept)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response["Retry-After"] == str(settings.OUTAGE_RETRY_AFTER_S)
    failing = {name: result for name, result in response.json().items() if result != "OK"}
    assert list(failing) == ["Workers()"] and "sweep" in failing["Workers()"]
    # The load balancer's probe leaves the workers out: the web server itself can serve.
    assert client.get("/readyz?scope=serving").status_code == 200


def test_readiness_names_the_database_when_it_cannot_be_reached(client, monkeypatch):
    from health_check import checks
    from health_check.exceptions import ServiceUnavailable

    def refused(self):
        raise ServiceUnavailable("connection refused")

    monkeypatch.setattr(checks.Database, "run", refused)
    response = client.get("/readyz?scope=serving")
    assert response.status_code == 503 and response.has_header("Retry-After")
    assert [name for name, result in response.json().items() if result != "OK"] == ["Database(alias='default')"]


@pytest.mark.parametrize(
    ("address", "headers", "status"),
    [
        ("127.0.0.1", {}, 200),
        ("203.0.113.9", {}, 404),  # the public
        ("127.0.0.1", {"HTTP_X_FORWARDED_FOR": "203.0.113.9"}, 404),  # the public, through the ingress
        ("203.0.113.9", {"HTTP_AUTHORIZATION": "Bearer wrong"}, 404),
        ("203.0.113.9", {"HTTP_AUTHORIZATION": "Bearer scrape-me"}, 200),
    ],
)
def test_metrics_are_for_the_operators_network_or_token_only(client, settings, address, headers, status):
    settings.METRICS_TOKEN = "scrape-me"
    assert client.get("/metrics", REMOTE_ADDR=address, **headers).status_code == status


def test_metrics_read_the_queue_the_units_and_why_jobs_wait(client, owner, renter):
    unit, _ = unit_online(owner, gpus=2)
    unit_online(owner, name="other")
    Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.SUSPECT)
    old = timezone.now() - timedelta(minutes=10)
    job_make(renter, gpu_count=1)
    waiting = job_make(renter, gpu_count=1)
    Job.objects.filter(pk=waiting.pk).update(
        created_at=old, pending_reason={"units_considered": 2, "rejected": {"vram": 1, "jurisdiction": 2}}
    )
    broke = job_make(renter, gpu_count=1)
    Job.objects.filter(pk=broke.pk).update(pending_reason={"units_considered": 1, "wallet": {"needed_micros": 1}})
    Job.objects.filter(pk=job_make(renter).pk).update(state=Job.State.RUNNING)

    scraped = scrape(client)
    assert scraped[("shedshare_jobs", (("state", "queued"),))] == 3
    assert scraped[("shedshare_jobs", (("state", "running"),))] == 1
    assert scraped[("shedshare_jobs", (("state", "placed"),))] == 0
    assert 590 < scraped[("shedshare_jobs_oldest_age_seconds", (("state", "queued"),))] < 3600
    pending = {labels[0][1]: value for (name, labels), value in scraped.items() if name == "shedshare_jobs_pending"}
    assert {reason: n for reason, n in pending.items() if n} == {"jurisdiction": 1, "wallet": 1, "not_tried": 1}
    assert scraped[("shedshare_units", (("status", "online"),))] == 1
    assert scraped[("shedshare_units", (("status", "suspect"),))] == 1
    assert scraped[("shedshare_outbox_messages", (("state", "failed"),))] == 0
    assert scraped[("shedshare_scrape_errors", (("app", "jobs"),))] == 0


def test_a_failing_app_read_is_counted_and_the_rest_still_served(client, monkeypatch):
    from marketplace.ops import metrics as ops_metrics

    def broken():
        raise RuntimeError("the database went away")
        yield

    monkeypatch.setitem(ops_metrics.COLLECTORS, "billing", broken)
    scraped = scrape(client)
    assert scraped[("shedshare_scrape_errors", (("app", "billing"),))] == 1
    assert scraped[("shedshare_scrape_errors", (("app", "nodes"),))] == 0
    assert ("shedshare_units", (("status", "online"),)) in scraped


def test_requests_are_counted_by_route_pattern_and_carry_a_request_id(client):
    before = metrics.HTTP_REQUESTS.labels("GET", "healthz", "2xx")._value.get()
    response = client.get("/healthz", HTTP_X_REQUEST_ID="probe-42")
    assert response["X-Request-ID"] == "probe-42"
    assert metrics.HTTP_REQUESTS.labels("GET", "healthz", "2xx")._value.get() == before + 1
    # One the client made up badly is replaced rather than echoed into the logs.
    assert client.get("/healthz", HTTP_X_REQUEST_ID="a b\n").headers["X-Request-ID"] != "a b\n"
    assert route_label("api/v1/jobs/(?P<pk>[0-9a-f-]{36})/?$") == "api/v1/jobs/<pk>"


def test_log_lines_carry_the_ids_bound_where_they_were_written():
    from pythonjsonlogger.json import JsonFormatter

    record = logging.LogRecord("shedshare", logging.INFO, __file__, 1, "job placed", None, None)
    with log_context(job="j-1", unit="u-1"), log_context(allocation="a-1"):
        assert log_fields() == {"job": "j-1", "unit": "u-1", "allocation": "a-1"}
        ContextFilter().filter(record)
    assert log_fields() == {}
    line = json.loads(JsonFormatter("%(levelname)s %(message)s").format(record))
    assert line | {} == {"levelname": "INFO", "message": "job placed", "job": "j-1", "unit": "u-1", "allocation": "a-1"}
    with pytest.raises(ValueError, match="not a log context field"):
        log_context(password="x").__enter__()


def test_a_jobs_steps_are_traced_under_its_submit_across_processes(settings):
    """The submit's span context goes through the cache, so a step recorded by another process
    (a worker placing it, a server hearing it started) is a child of the submit's span."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from marketplace.kernel.tracing import trace_remember, trace_step

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    settings.OTEL_EXPORTER_OTLP_ENDPOINT = ""
    trace_step("job.placed", "job-0")  # switched off: nothing recorded
    assert exporter.get_finished_spans() == ()

    settings.OTEL_EXPORTER_OTLP_ENDPOINT = "http://collector.invalid:4318"
    with trace.get_tracer("test").start_as_current_span("POST /api/v1/jobs") as submit:
        trace_remember("job-1")
    trace_step("job.placed", "job-1", unit="u-1")
    trace_step("job.started", "job-1")
    spans = {span.name: span for span in exporter.get_finished_spans()}
    for step in ("job.placed", "job.started"):
        assert spans[step].parent.span_id == submit.get_span_context().span_id
        assert spans[step].context.trace_id == submit.get_span_context().trace_id
    assert spans["job.placed"].attributes["shedshare.unit"] == "u-1"


def test_the_grafana_dashboard_shows_only_metrics_the_marketplace_exports(client):
    import re
    from pathlib import Path

    from django.conf import settings

    dashboard = json.loads((Path(settings.BASE_DIR) / "docker" / "grafana" / "shedshare.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", name) for e in exprs for name in re.findall(r"shedshare_\w+", e)}
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    exported = {family.name for family in text_string_to_metric_families(response.content.decode())}
    assert len(shown) > 20 and shown <= exported, shown - exported
