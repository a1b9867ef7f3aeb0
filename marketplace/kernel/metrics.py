"""The marketplace's own Prometheus metrics that processes count as things happen (placements,
pushes, heartbeats, retention). Figures read from the database at scrape time (queue depth,
units by state, outbox backlog) are each app's ``metrics.collect``, gathered by the project's
``/metrics`` view.

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn workers, Celery prefork children), each process
writes its values to files there and the view sums them; without it (one process: the demo,
tests), the default registry holds them. Names start ``shedshare_``; labels stay few and bounded
(never a job, unit or renter id)."""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HTTP_REQUESTS = Counter(
    "shedshare_http_requests", "HTTP requests answered, by route and status class.", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "shedshare_http_request_duration_seconds", "Time to answer an HTTP request, by route.", ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
DB_QUERIES = Histogram(
    "shedshare_http_request_db_queries", "Database queries one HTTP request made.", ["route"],
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200),
)

PLACEMENTS = Counter("shedshare_placements", "Jobs placed on a unit.")
PLACEMENT_LOST_RACES = Counter(
    "shedshare_placement_lost_races", "Placements given up because another placement took the slices first."
)
ASSIGNMENT_PUSH = Histogram(
    "shedshare_assignment_push_seconds", "From a placement's commit to its assignment sent down the agent's stream.",
    buckets=_LATENCY_BUCKETS,
)
HEARTBEATS = Counter("shedshare_heartbeats", "Heartbeats received, by path (stream or http) and kind.", ["path", "kind"])
HEARTBEAT_LAG = Histogram(
    "shedshare_heartbeat_lag_seconds", "From an agent's heartbeat arriving to its answer.", buckets=_LATENCY_BUCKETS
)
WALLET_FLOOR_STOPS = Counter(
    "shedshare_wallet_floor_stops", "Jobs stopped because the renter's wallet reached its floor."
)

RETENTION_ROWS = Counter(
    "shedshare_retention_rows", "Rows the retention tasks rolled up, archived or pruned.", ["table", "action"]
)
RETENTION_LAST_RUN = Gauge(
    "shedshare_retention_last_success_timestamp_seconds", "When each retention task last finished (Unix time).",
    ["task"], multiprocess_mode="max",
)
