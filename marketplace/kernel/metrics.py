"""The marketplace's own Prometheus metrics that processes count as things happen (placements,
pushes, heartbeats, retention). Figures read from the database at scrape time (queue depth,
units by state, outbox backlog) are each app's ``metrics.collect``, gathered by the project's
``/metrics`` view.

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn workers, Celery prefork children), each process
writes its values to files there and the view sums them; without it (one process: the demo,
tests), the default registry holds them. Names start ``shedshare_``; labels stay few and bounded
(never a job, unit or renter id)."""

import time

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HTTP_REQUESTS = Counter(
    "shedshare_http_requests", "HTTP requests answered, by route and status class.", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "shedshare_http_request_duration_seconds", "Time to answer an HTTP request, by route.", ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
DB_QUERY_SECONDS = Histogram(
    "shedshare_db_query_duration_seconds", "Database queries, timed, by connection alias.", ["alias"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
DB_ERRORS = Counter("shedshare_db_errors", "Database queries that raised, by connection alias.", ["alias"])

PLACEMENTS = Counter("shedshare_placements", "Jobs placed on a unit.")
PLACEMENT_LOST_RACES = Counter(
    "shedshare_placement_lost_races", "Placements given up because another placement took the slices first."
)
ASSIGNMENT_PUSH = Histogram(
    "shedshare_assignment_push_seconds",
    "From a placement to its assignment handed to the agent: pushed down its stream, or pulled by its poll.",
    buckets=_LATENCY_BUCKETS,
)
HEARTBEATS = Counter(
    "shedshare_heartbeats", "Heartbeats received, by path (stream or http) and kind (cheap or full).", ["path", "kind"]
)
HEARTBEAT_SECONDS = Histogram(
    "shedshare_heartbeat_seconds", "From an agent's heartbeat arriving to its answer, by path.", ["path"],
    buckets=_LATENCY_BUCKETS,
)
WALLET_FLOOR_STOPS = Counter(
    "shedshare_wallet_floor_stops", "Jobs stopped because the renter's wallet reached its floor."
)

RECONCILE_DRIFT = Gauge(
    "shedshare_reconcile_drift",
    "Drifts the last Stripe reconciliation found between the ledger, the outbox and Stripe.",
    multiprocess_mode="mostrecent",
)
RECONCILE_LAST_RUN = Gauge(
    "shedshare_reconcile_last_success_timestamp_seconds", "When the Stripe reconciliation last finished (Unix time).",
    multiprocess_mode="max",
)

RETENTION_ROWS = Counter(
    "shedshare_retention_rows", "Rows the retention tasks rolled up, archived or pruned.", ["table", "action"]
)
RETENTION_LAST_RUN = Gauge(
    "shedshare_retention_last_success_timestamp_seconds", "When each retention task last finished (Unix time).",
    ["task"], multiprocess_mode="max",
)


def _timed_query(execute, sql, params, many, context):
    alias = context["connection"].alias
    began = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    except Exception:
        DB_ERRORS.labels(alias).inc()
        raise
    finally:
        DB_QUERY_SECONDS.labels(alias).observe(time.perf_counter() - began)


def db_connection_observed(sender, connection, **_) -> None:
    """``connection_created``: time every query the connection makes (once per wrapper: a
    wrapper reconnects without losing its execute wrappers)."""
    if _timed_query not in connection.execute_wrappers:
        connection.execute_wrappers.append(_timed_query)
