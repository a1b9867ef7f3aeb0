"""Django settings shared by every deployment, read from the environment (see README "Configuration").

``production`` adds what only a deployment behind TLS needs; ``test`` what the suite needs."""

import importlib.util
import ipaddress
import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured
from django.core.management.utils import get_random_secret_key
from kombu import Exchange, Queue

from marketplace.kernel.env import env_bool, env_float, env_int, env_list, env_ordinal, env_str

BASE_DIR = Path(__file__).resolve().parent.parent.parent
DATA_DIR = Path(env_str("SHEDSHARE_DATA_DIR", str(BASE_DIR / ".data")))
DATA_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = env_bool("DEBUG", False)


def _development_secret_key() -> str:
    # Tokens are HMACs keyed with SECRET_KEY, so every process of a development install must
    # agree on it: generate one once and keep it beside the data.
    path = DATA_DIR / "dev-secret-key"
    if not path.exists():
        path.write_text(get_random_secret_key())
        path.chmod(0o600)
    return path.read_text().strip()


# Production must provide a secret key; only development generates one.
SECRET_KEY = env_str("SECRET_KEY", required=not DEBUG) or _development_secret_key()


def _development_secrets_key() -> list[str]:
    # Renters' secrets are sealed with keys of their own (marketplace/kernel/sealing.py); a
    # development install generates one beside the data, as it does SECRET_KEY.
    from cryptography.fernet import Fernet

    path = DATA_DIR / "dev-secrets-key"
    if not path.exists():
        path.write_bytes(Fernet.generate_key())
        path.chmod(0o600)
    return [path.read_text().strip()]


# Fernet keys for renters' secrets, newest first (comma-separated). Production sets them; without
# any, storing or delivering a secret is refused (503), and `manage.py check` warns.
SECRETS_KEYS = env_list("SECRETS_KEYS", []) or (_development_secrets_key() if DEBUG else [])
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
PUBLIC_URL = env_str("PUBLIC_URL", "http://127.0.0.1:8000")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_countries",
    "axes",  # login lockouts (see "Accounts and production hardening" below)
    "marketplace.apps.ProjectConfig",
    "marketplace.kernel",
    "marketplace.accounts",
    "nodes",
    "marketplace.jobs",
    "billing",
]
# Development tools (benchmarks, the demo) are left out of the wheel and the image.
if importlib.util.find_spec("marketplace.devtools") is not None:
    INSTALLED_APPS.append("marketplace.devtools")
AUTH_USER_MODEL = "accounts.User"

MIDDLEWARE = [
    "marketplace.kernel.middleware.ObservedRequestMiddleware",  # first: request id, timing, every answer counted
    "marketplace.kernel.middleware.RequestBoundsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "marketplace.kernel.middleware.StaticFilesMiddleware",  # WhiteNoise
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "axes.middleware.AxesMiddleware",  # it answers for a login that axes locked out
    "marketplace.kernel.outages.OutageMiddleware",  # last, so it sees the views' errors first
]
# What an answer during an outage of the database, broker or cache asks the client to wait.
OUTAGE_RETRY_AFTER_S = env_int("OUTAGE_RETRY_AFTER_S", 5)

ROOT_URLCONF = "marketplace.urls"
WSGI_APPLICATION = "marketplace.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database(url: str) -> dict:
    # Connections are kept (and checked before reuse): a Celery worker placing jobs one task at
    # a time would otherwise open a new PostgreSQL connection for every task.
    config = dj_database_url.parse(url, conn_max_age=env_int("DB_CONN_MAX_AGE", 60), conn_health_checks=True)
    postgres = config["ENGINE"] == "django.db.backends.postgresql"
    if postgres:
        # Fails fast while the database is unreachable (see the module), and never waits long
        # for a connection: an outage is answered with 503 at once, not after a timeout.
        config["ENGINE"] = "marketplace.kernel.postgres"
        config["OPTIONS"] = {"connect_timeout": env_int("DB_CONNECT_TIMEOUT_S", 3)}
        # Behind a pooler in transaction mode (PgBouncer) a named cursor does not outlive its
        # transaction's server connection: QuerySet.iterator() must then read client-side.
        config["DISABLE_SERVER_SIDE_CURSORS"] = env_bool("DB_TRANSACTION_POOLER", False)
    if postgres and env_bool("DB_POOL", False):
        # The ASGI web process (marketplace/asgi.py turns this on) runs each request's synchronous
        # part in a thread of its own and closes the connection after it, and a long poll between
        # two looks: a pool makes that a checkout instead of a new PostgreSQL connection.
        config["CONN_MAX_AGE"] = 0
        pool = {"min_size": 2, "max_size": env_int("DB_POOL_MAX_SIZE", 20), "timeout": env_int("DB_POOL_TIMEOUT_S", 3)}
        config["OPTIONS"]["pool"] = pool
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # Web, worker, beat and test processes share one file: WAL lets readers run beside the
        # writer, IMMEDIATE transactions take the write lock up front instead of failing on
        # upgrade, and the timeout turns contention into waiting.
        config["OPTIONS"] = {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    return config


# After a failed connection, how long a process answers 503 at once before it tries again.
DB_UNREACHABLE_HOLD_S = env_int("DB_UNREACHABLE_HOLD_S", 2)
DATABASES = {"default": _database(env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'shedshare.sqlite3'}"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "portal:unit_list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Hashed, compressed file names where collectstatic has been run for them (the Docker image sets
# STATIC_MANIFEST=true for both); otherwise (development, the demo, tests) whitenoise serves the
# apps' static folders as they are.
STATIC_MANIFEST = env_bool("STATIC_MANIFEST", False)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if STATIC_MANIFEST
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not STATIC_MANIFEST


REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.accounts.api.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.IsAuthenticated",
        "marketplace.accounts.api.auth.ApiKeyScopePermission",
    ],
    "DEFAULT_THROTTLE_CLASSES": [
        "marketplace.accounts.api.auth.ApiKeyRateThrottle",
        "marketplace.accounts.api.auth.ApiKeySubmitThrottle",
    ],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["marketplace.kernel.api.parsers.BoundedJSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "marketplace.kernel.api.renderers.FormatNegotiation",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "marketplace.kernel.api.errors.problem_exception_handler",
    "DEFAULT_PAGINATION_CLASS": "marketplace.kernel.api.pagination.BoundedLimitOffsetPagination",
    "PAGE_SIZE": 50,
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
# A request body larger than this is a 413 problem; the ASGI application refuses it before Django
# reads it (marketplace/kernel/asgi.py), the API's JSON parser again (kernel/api/parsers.py).
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("REQUEST_MAX_BYTES", 2_621_440)
SPECTACULAR_SETTINGS = {
    "TITLE": "Shedshare API",
    "DESCRIPTION": "Renter and node-agent APIs of the Shedshare GPU marketplace.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "marketplace.kernel.api.schema.problem_responses",  # the errors every view can answer with
    ],
}

# Marketplace tunables.
ENROLMENT_TOKEN_TTL = timedelta(hours=env_int("ENROLMENT_TOKEN_TTL_HOURS", 24))
HEARTBEAT_INTERVAL_S = env_int("HEARTBEAT_INTERVAL_S", 5)
# Thresholds plus the sweep period keep a silent unit suspect within 15 s and offline within 50 s.
LIVENESS_SWEEP_S = env_int("LIVENESS_SWEEP_S", 2)
UNIT_SUSPECT_AFTER = timedelta(seconds=env_int("UNIT_SUSPECT_AFTER_S", 12))
UNIT_OFFLINE_AFTER = timedelta(seconds=env_int("UNIT_OFFLINE_AFTER_S", 47))
# No liveness sweep for longer than this means the server itself was away (database, broker,
# workers): units are then judged afresh from the sweep that follows (nodes.services).
LIVENESS_OUTAGE_AFTER = timedelta(seconds=env_int("LIVENESS_OUTAGE_AFTER_S", 10))
# The web server's /healthz as the agents reach it (through the same proxy, if any). While it does
# not answer, no heartbeat could have arrived, so the sweep holds its verdicts; units get a fresh
# grace when it answers again. Empty: not probed (an outage of the web tier alone is then judged
# as the units' silence).
LIVENESS_PROBE_URL = env_str("LIVENESS_PROBE_URL", "")
JOB_MAX_ATTEMPTS = env_int("JOB_MAX_ATTEMPTS", 3)
JOB_DEFAULT_MAX_DURATION_S = 3600
JOB_MAX_DURATION_S = 30 * 24 * 3600  # also a service's default: it runs until stopped, within this
# A placement worker re-reads changed units at most this often while placing job after job.
PLACEMENT_REFRESH_INTERVAL_S = env_int("PLACEMENT_REFRESH_INTERVAL_MS", 20) / 1000
# ... and rebuilds its view from scratch about this often (each process at its own moment).
PLACEMENT_REBUILD_INTERVAL_S = env_int("PLACEMENT_REBUILD_INTERVAL_S", 600)
# Placement worker processes prefer disjoint shards of the units, so that concurrent workers pack
# their own units instead of racing for the same best one; set it to the worker's concurrency.
PLACEMENT_SHARDS = env_int("PLACEMENT_SHARDS", 1)
# Several placement workers (the Kubernetes StatefulSet's pods) share the shards out: worker N's
# processes prefer shards N x PLACEMENT_WORKER_PROCESSES onwards, and PLACEMENT_SHARDS then counts
# the processes of all of them. PLACEMENT_WORKER is N, or the pod's own name `<set>-N`.
PLACEMENT_SHARD_FIRST = env_ordinal("PLACEMENT_WORKER", 0) * env_int("PLACEMENT_WORKER_PROCESSES", 1)
# A placement no agent has pulled after this long is released and its job queued again.
ASSIGNMENT_ACK_TIMEOUT = timedelta(seconds=env_int("ASSIGNMENT_ACK_TIMEOUT_S", 60))
# An agent that pulled a job this long ago but no longer reports it has lost it.
AGENT_LOST_GRACE = timedelta(seconds=env_int("AGENT_LOST_GRACE_S", 30))
ASSIGNMENT_LONG_POLL_MAX_S = env_int("ASSIGNMENT_LONG_POLL_MAX_S", 20)
# A unit whose agent refused a job is not offered that job again for this long (a refusal for any
# reason but backyard limits keeps it away for good); refusals are not the job's attempts.
REFUSAL_HOLD_S = env_int("REFUSAL_HOLD_S", 900)
# Usage plausibility (marketplace/jobs/usage.py). Usage is taken while the allocation is active
# and for USAGE_LATE_GRACE_S after its release (reports the agent buffered); each sample's
# recorded_at lies in the allocation's life give or take USAGE_CLOCK_SKEW_S (twice what the
# agent's doctor allows); in total at most its GPUs x the time it was active, plus
# USAGE_TOLERANCE_S seconds of each GPU.
USAGE_LATE_GRACE_S = env_int("USAGE_LATE_GRACE_S", 300)
USAGE_CLOCK_SKEW_S = env_int("USAGE_CLOCK_SKEW_S", 120)
USAGE_TOLERANCE_S = env_int("USAGE_TOLERANCE_S", 30)
# This many implausible usage reports from one unit within the window put it under review.
USAGE_REVIEW_AFTER = env_int("USAGE_REVIEW_AFTER", 5)
USAGE_REVIEW_WINDOW = timedelta(seconds=env_int("USAGE_REVIEW_WINDOW_S", 3600))
# Long polls (a job's logs, the agent's next assignment) wait without holding a thread, and each
# API key, and each unit, holds at most this many at once; beyond that a poll answers at once.
LONG_POLL_WAITS_PER_KEY = env_int("LONG_POLL_WAITS_PER_KEY", 4)
LONG_POLL_WAITS_PER_UNIT = env_int("LONG_POLL_WAITS_PER_UNIT", 2)
# How many reverse proxies in front of the web server append to X-Forwarded-For. The agent's
# public address (location evidence) is read that many hops from the right; with 0 the header is
# ignored, because anyone can send it.
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0)
PLATFORM_FEE_PERCENT = env_int("PLATFORM_FEE_PERCENT", 15)
CURRENCY = env_str("CURRENCY", "usd")

# Stripe (used from the billing issue on; tests point the SDK at a local fake).
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY", "")
STRIPE_PUBLISHABLE_KEY = env_str("STRIPE_PUBLISHABLE_KEY", "")
# Webhook signing secrets, comma-separated: during a rotation both the old and the new one hold.
STRIPE_WEBHOOK_SECRETS = env_list("STRIPE_WEBHOOK_SECRETS", [])
STRIPE_WEBHOOK_TOLERANCE_S = env_int("STRIPE_WEBHOOK_TOLERANCE_S", 300)
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "")
# Micro-units per minor unit of CURRENCY (cents): amounts are rounded to it only towards Stripe.
MICROS_PER_MINOR = 10_000
# An outbox row older than this is looked up at Stripe before it is sent again (Stripe keeps
# idempotency keys for 24 hours).
OUTBOX_LOOKUP_AFTER = timedelta(hours=env_int("OUTBOX_LOOKUP_AFTER_H", 20))
# A job is placed only if the renter's wallet covers this long a run of it; running jobs are
# stopped before the wallet would fall below WALLET_FLOOR.
WALLET_MIN_RUN_S = env_int("WALLET_MIN_RUN_S", 600)
# Running jobs' usage is posted to the ledger every this often, in bulk (a job's end is posted at
# once); 0 posts each agent report as it arrives.
USAGE_POSTING_INTERVAL_S = env_int("USAGE_POSTING_INTERVAL_S", 15)
WALLET_FLOOR_MICROS = env_int("WALLET_FLOOR_MICROS", 0)
# Owner payouts: a share of the payable and all earned in the last days stay back (chargebacks
# arrive late), and transfers under the minimum (minor units) wait for the next run.
PAYOUT_RESERVE_PERCENT = env_int("PAYOUT_RESERVE_PERCENT", 10)
PAYOUT_HOLD_DAYS = env_int("PAYOUT_HOLD_DAYS", 7)
PAYOUT_MINIMUM_MINOR = env_int("PAYOUT_MINIMUM_MINOR", 100)

# --- Retention (marketplace/jobs/retention.py, billing/retention.py, marketplace/kernel/retention.py)
# A renter may question a usage charge for this long after the allocation ended: until then its
# raw samples stay; after it they are rolled up into hourly rows (which statements, meter events
# and job totals read from then on) and go. The ledger is never pruned.
USAGE_DISPUTE_WINDOW_DAYS = env_int("USAGE_DISPUTE_WINDOW_DAYS", 35)
# Samples are partitioned by their allocation's start, a partition per week (PostgreSQL): made
# this many weeks ahead, dropped once every allocation in it ended more than the window ago.
USAGE_PARTITIONS_AHEAD_WEEKS = env_int("USAGE_PARTITIONS_AHEAD_WEEKS", 4)
RETENTION_LOG_DAYS = env_int("RETENTION_LOG_DAYS", 90)  # after the allocation ended
RETENTION_AUDIT_DAYS = env_int("RETENTION_AUDIT_DAYS", 400)  # then archived to RETENTION_ARCHIVE_DIR
RETENTION_OUTBOX_DAYS = env_int("RETENTION_OUTBOX_DAYS", 90)  # sent or failed rows only
# Processed webhook events are what makes a redelivered event a duplicate: Stripe retries for up
# to three days, so fewer than RETENTION_WEBHOOK_MIN_DAYS is refused.
RETENTION_WEBHOOK_DAYS = env_int("RETENTION_WEBHOOK_DAYS", 30)
RETENTION_WEBHOOK_MIN_DAYS = 7
if RETENTION_WEBHOOK_DAYS < RETENTION_WEBHOOK_MIN_DAYS:
    raise ImproperlyConfigured(f"RETENTION_WEBHOOK_DAYS must be at least {RETENTION_WEBHOOK_MIN_DAYS}.")
RETENTION_ARCHIVE_DIR = Path(env_str("RETENTION_ARCHIVE_DIR", str(DATA_DIR / "archive")))
# Rows per retention transaction, and the seconds one task run spends before it leaves the rest
# to the next run (under CELERY_TASK_SOFT_TIME_LIMIT).
RETENTION_BATCH = env_int("RETENTION_BATCH", 5000)
RETENTION_RUN_BUDGET_S = env_int("RETENTION_RUN_BUDGET_S", 40)


# --- Accounts and production hardening: shared throttles, lockouts, mail, CSP ---------------
# (production.py adds HTTPS, HSTS and secure cookies; README "Configuration" lists the variables.)

# Counters that must hold across processes (rate limits, long-poll slots) live in the cache, so
# with REDIS_URL every web process counts against the same limits; without it (the embedded
# default, one web process) in that process's memory.
_cache_url = env_str("CACHE_URL") or env_str("REDIS_URL")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": _cache_url,
        "KEY_PREFIX": "shedshare",
        # A cache that does not answer soon is treated as down (limits are then let through).
        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
    }
    if _cache_url
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}
# "<count>/<sec|min|hour|day>", counted over a sliding window in the cache.
# Per renter: all of an account's API keys and its session login share one budget.
API_RATE_LIMIT = env_str("API_RATE_LIMIT", "120/min")
API_SUBMIT_RATE_LIMIT = env_str("API_SUBMIT_RATE_LIMIT", "30/min")
# Active (neither revoked nor expired) API keys one account may hold.
API_KEYS_PER_USER = env_int("API_KEYS_PER_USER", 20)
# Renters' secrets (marketplace/accounts/secrets.py) an account may hold, and the bounds of a
# job's environment: variables and secrets together, each value, and all of it.
SECRETS_PER_USER = env_int("SECRETS_PER_USER", 100)
JOB_TEMPLATES_PER_USER = env_int("JOB_TEMPLATES_PER_USER", 100)
JOB_ENV_MAX_VARIABLES = 64
JOB_ENV_MAX_VALUE_BYTES = 32 * 1024
JOB_ENV_MAX_BYTES = 64 * 1024
# Per unit, whatever address its agent calls from. An honest agent makes about two calls a second
# at the tests' 1 s heartbeat (a heartbeat and an assignment poll) and at most ten report calls
# per 0.25 s tick while it catches up: the limits sit above both. Heartbeats have their own budget,
# so a flood of reports cannot make a unit miss them.
AGENT_RATE_LIMIT = env_str("AGENT_RATE_LIMIT", "3000/min")
AGENT_HEARTBEAT_RATE_LIMIT = env_str("AGENT_HEARTBEAT_RATE_LIMIT", "240/min")
# Failed enrolments (bad, used or expired tokens, bad bodies) one address may make before its
# enrolments are refused with a 429 until they age out.
ENROL_FAILURE_LIMIT = env_str("ENROL_FAILURE_LIMIT", "10/hour")
# Password-reset requests per address and per e-mail address (each is a mail sent to someone).
PASSWORD_RESET_RATE_LIMIT = env_str("PASSWORD_RESET_RATE_LIMIT", "10/hour")
PASSWORD_RESET_EMAIL_RATE_LIMIT = env_str("PASSWORD_RESET_EMAIL_RATE_LIMIT", "3/hour")

# Logins (the portal's and the admin's) with django-axes: after LOGIN_FAILURE_LIMIT wrong
# passwords for one username, or from one address, that username or address cannot log in, even
# with the right password, until LOGIN_LOCKOUT_MINUTES have passed without another failure. A
# password reset lifts the lock on its account. Attempts are rows in the database, shared by all
# web processes.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_LOCKOUT_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_LOCKOUT_CALLABLE = "marketplace.accounts.views.login_locked_out"
AXES_CLIENT_IP_CALLABLE = "marketplace.kernel.addresses.client_address"
AXES_DISABLE_ACCESS_LOG = True  # successful logins are not recorded; failures are
AXES_VERBOSE = False

# Mail carries password-reset links. EMAIL_HOST (with EMAIL_PORT, EMAIL_HOST_USER,
# EMAIL_HOST_PASSWORD, EMAIL_USE_TLS or EMAIL_USE_SSL) sends through SMTP; EMAIL_BACKEND names
# any other backend. Without either, development prints mail to the console, and production
# (production.py) sends none and says password reset is unavailable.
EMAIL_HOST = env_str("EMAIL_HOST", "")
EMAIL_PORT = env_int("EMAIL_PORT", 587)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
if EMAIL_USE_SSL:
    EMAIL_USE_TLS = False  # implicit TLS (port 465) and STARTTLS exclude each other
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Shedshare <noreply@localhost>")
EMAIL_BACKEND = env_str(
    "EMAIL_BACKEND",
    "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST else "django.core.mail.backends.console.EmailBackend",
)
MAIL_CONFIGURED = True

# Content-Security-Policy (django-csp): scripts and styles only from our own static files (the
# portal has no inline script or style; htmx is vendored), nothing framed, no plugins.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}
# --- end of accounts and production hardening --------------------------------------------


def _broker_url() -> str:
    return env_str("CELERY_BROKER_URL") or env_str("REDIS_URL") or "filesystem://"


CELERY_BROKER_URL = _broker_url()
if CELERY_BROKER_URL.startswith("filesystem://"):
    # The embedded default: messages are files in one folder shared by every process on this
    # machine, so real worker processes run without a broker server.
    _queue_dir = DATA_DIR / "broker"
    _queue_dir.mkdir(parents=True, exist_ok=True)
    # kombu's file-system transport with atomic writes and claims (marketplace/kernel/broker.py).
    CELERY_BROKER_TRANSPORT = "marketplace.kernel.broker:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "control_folder": str(DATA_DIR / "broker-control"),
        "polling_interval": 0.1,
    }
else:
    # A broker that does not answer costs a publish about this long; the work is then left to
    # its sweep (marketplace/kernel/tasks.py), so a request never fails for it.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2}
    if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
        # kombu's Redis transport, whose worker survives Redis going away (marketplace/kernel/broker.py).
        CELERY_BROKER_TRANSPORT = "marketplace.kernel.broker:RedisTransport"
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_TIME_LIMIT = 60
CELERY_TASK_SOFT_TIME_LIMIT = 50
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Queues. Placement workers take `placement` (each of their processes builds a capacity view of every
# unit when it starts); the calls to Stripe and the daily money runs wait on `billing`, so that a
# slow Stripe never holds up the liveness sweep; everything else goes to Celery's default queue.
# All three are declared, so a worker started without -Q (the demo, compose, the tests, the
# benchmarks) takes them all; the Kubernetes deployment runs one kind of worker per queue. Each
# queue has an exchange of its own: three queues bound to one with one key would each get every task.
CELERY_TASK_QUEUES = [Queue(name, Exchange(name), routing_key=name) for name in ("celery", "placement", "billing")]
_QUEUE_TASKS = {
    "placement": ("marketplace.jobs.tasks.job_place", "marketplace.jobs.tasks.placement_pass",
                  "marketplace.jobs.tasks.placement_sweep"),
    "billing": ("billing.tasks.outbox_send", "billing.tasks.outbox_sweep", "billing.tasks.webhook_process",
                "billing.tasks.meter_events_enqueue", "billing.tasks.payouts_run", "billing.tasks.stripe_reconcile"),
}  # fmt: skip
CELERY_TASK_ROUTES = {task: {"queue": queue} for queue, tasks in _QUEUE_TASKS.items() for task in tasks}
# Celery's Django fix-up would close the database connection around every task (a new
# connection each time costs more than most of our tasks); the connection is kept for this many
# tasks instead, and marketplace.celery drops it by CONN_MAX_AGE and health, as Django does.
CELERY_DB_REUSE_MAX = 10_000
# Each worker process builds its placement capacity view before taking tasks (seconds at 10,000 units).
CELERY_WORKER_PROC_ALIVE_TIMEOUT = 120
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = TIME_ZONE
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "placement-sweep": {"task": "marketplace.jobs.tasks.placement_sweep", "schedule": 10.0},
    "offer-snapshots": {"task": "marketplace.jobs.tasks.offer_snapshots_refresh", "schedule": 5.0},
    "usage-rating": {"task": "billing.tasks.usage_rate_sweep", "schedule": float(max(USAGE_POSTING_INTERVAL_S, 1))},
    "unit-liveness": {"task": "nodes.tasks.unit_liveness_sweep", "schedule": float(LIVENESS_SWEEP_S)},
    # Five minutes past the hour, when the agents' samples of the hour just ended are in (a later
    # one is billed in the next hour's event).
    "meter-events": {"task": "billing.tasks.meter_events_enqueue", "schedule": crontab(minute=5)},
    "stripe-outbox-sweep": {"task": "billing.tasks.outbox_sweep", "schedule": 30.0},
    "owner-payouts": {"task": "billing.tasks.payouts_run", "schedule": crontab(hour=6, minute=0)},
    "stripe-reconcile": {"task": "billing.tasks.stripe_reconcile", "schedule": crontab(hour=5, minute=30)},
    "idempotency-prune": {"task": "marketplace.jobs.tasks.idempotency_records_prune", "schedule": crontab(minute=17)},
    # Retention: each run does what fits in RETENTION_RUN_BUDGET_S and leaves the rest to the next.
    "usage-roll-up": {"task": "marketplace.jobs.tasks.usage_samples_roll_up", "schedule": crontab(minute=23)},
    "usage-partitions": {
        "task": "marketplace.jobs.tasks.usage_partitions_maintain",
        "schedule": crontab(hour=3, minute=41),
    },
    "log-chunks-prune": {"task": "marketplace.jobs.tasks.log_chunks_prune", "schedule": crontab(minute=29)},
    "audit-archive": {"task": "marketplace.kernel.tasks.audit_events_archive", "schedule": crontab(minute=35)},
    "outbox-prune": {"task": "billing.tasks.outbox_messages_prune", "schedule": crontab(minute=47)},
    "webhooks-prune": {"task": "billing.tasks.webhook_events_prune", "schedule": crontab(minute=53)},
}

# --- Operations (marketplace/ops/, README "Operations") -------------------------------------------
# Logs: one JSON object per line in production (LOG_FORMAT=json: time, level, logger, message,
# and the request, job, allocation, unit, renter and task ids bound where the line was written,
# marketplace.kernel.logcontext); plain lines with DEBUG on, for a person at a terminal.
LOG_FORMAT = env_str("LOG_FORMAT", "plain" if DEBUG else "json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "marketplace.kernel.logcontext.ContextFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            "timestamp": False,
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
# /metrics answers a request bearing this token, or one from these networks that came through no
# proxy (marketplace/ops/metrics.py); anyone else gets a 404. Set the pod network in Kubernetes.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
METRICS_ALLOWED_NETWORKS = [
    ipaddress.ip_network(network, strict=False)
    for network in env_list("METRICS_ALLOWED_NETWORKS", ["127.0.0.0/8", "::1/128"])
]
# A Celery worker serves its host's metrics on this port (0: none); the web server's /metrics
# covers only the processes that share its PROMETHEUS_MULTIPROC_DIR.
METRICS_WORKER_PORT = env_int("METRICS_WORKER_PORT", 0)
if _metrics_dir := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    Path(_metrics_dir).mkdir(parents=True, exist_ok=True)  # a fresh emptyDir has none yet
# /readyz reports the workers stopped once the liveness sweep (every LIVENESS_SWEEP_S) is this late.
READINESS_WORKERS_STALE_S = env_int("READINESS_WORKERS_STALE_S", max(60, 10 * LIVENESS_SWEEP_S))
# Error reports (Sentry) and traces (OpenTelemetry over OTLP/HTTP) are off unless configured.
SENTRY_DSN = env_str("SENTRY_DSN", "")
SENTRY_ENVIRONMENT = env_str("SENTRY_ENVIRONMENT", "production")
SENTRY_TRACES_SAMPLE_RATE = env_float("SENTRY_TRACES_SAMPLE_RATE", 0.0)
# The standard variable: e.g. http://otel-collector:4318. OTEL_SERVICE_NAME names the process.
OTEL_EXPORTER_OTLP_ENDPOINT = env_str("OTEL_EXPORTER_OTLP_ENDPOINT", "")

# Registries on private addresses that jobs may name anyway (`host[:port]`, exactly): the
# operator's own mirror next to the sheds. Empty: only public registries (each shed's owner must
# still list a mirror in the agent's registry_mirrors for its agent to pull from it).
JOB_IMAGE_PRIVATE_REGISTRIES = env_list("JOB_IMAGE_PRIVATE_REGISTRIES", [])
# Hosts (host or host:port) a job's inputs and outputs may be at although they are loopback or
# private, over plain HTTP too: a development or test object store. Empty in production.
JOB_DATA_PRIVATE_HOSTS = env_list("JOB_DATA_PRIVATE_HOSTS", [])

# --- Agent streams (marketplace/jobs/agent_stream/, nodes/streams.py) -----------------------------
# Over a stream an agent beats every HEARTBEAT_INTERVAL_S while something changes (jobs starting
# or ending, limits, inventory) and every HEARTBEAT_IDLE_INTERVAL_S once nothing has changed for
# STREAM_ACTIVE_HOLD_S: the stream itself (its server's lease, the WebSocket pings) is what keeps
# the unit counted as seen, so an idle beat only proves the agent's loop is turning. A stream with
# no heartbeat for STREAM_SILENT_S is closed, and the unit goes suspect.
HEARTBEAT_IDLE_INTERVAL_S = env_int("HEARTBEAT_IDLE_INTERVAL_S", 20)
STREAM_ACTIVE_HOLD_S = env_int("STREAM_ACTIVE_HOLD_S", 30)
STREAM_SILENT_S = env_int("STREAM_SILENT_S", 3 * HEARTBEAT_IDLE_INTERVAL_S + 10)
# A heartbeat that changes nothing is answered from memory, but at least this often one goes
# through in full (reconciling the unit's allocations, as over HTTP).
STREAM_FULL_BEAT_S = env_int("STREAM_FULL_BEAT_S", 600)
# A connection server renews its lease (one row for all its units) this often; the units it holds
# count as seen up to its last renewal, so it must be well under UNIT_SUSPECT_AFTER.
STREAM_LEASE_RENEW_S = env_float("STREAM_LEASE_RENEW_S", 2.0)
# How often a connection server reads new nudges (a placement, a cancel, a policy change): the
# most a push waits for.
STREAM_NUDGE_POLL_S = env_float("STREAM_NUDGE_POLL_S", 0.1)
STREAM_NUDGE_KEEP = timedelta(minutes=env_int("STREAM_NUDGE_KEEP_MIN", 10))
# Threads per connection server for the database work behind streams (full heartbeats, reports).
STREAM_THREADS = env_int("STREAM_THREADS", 8)
# New streams are refused at once (1013: the agent polls over HTTP and tries again later) while
# this many agents' calls wait for a thread: at the tens of calls a second one server's pool
# serves, a deeper queue would outlast the agent's 10 s handshake timeout, and a reconnecting
# fleet would pile up admissions whose agents have already given up.
STREAM_ADMIT_BACKLOG = env_int("STREAM_ADMIT_BACKLOG", 8 * STREAM_THREADS)
# Calls one stream may have in flight, and make a second (bursts of ten seconds' worth); beyond
# either a call is answered 429 at once.
STREAM_CALLS_IN_FLIGHT = env_int("STREAM_CALLS_IN_FLIGHT", 32)
STREAM_FRAMES_PER_S = env_int("STREAM_FRAMES_PER_S", 20)
# Usage samples a connection server stores in one transaction at most (agent_stream/server.py):
# the reports waiting beyond it go in the next round (a report larger than it goes alone). A
# round's statements grow with its samples, so the bound keeps one round short: an honest agent
# reports about ten samples a call, and a report may carry up to 1,000.
STREAM_USAGE_ROUND_SAMPLES = env_int("STREAM_USAGE_ROUND_SAMPLES", 10_000)
# A connection server logs a line of what it served (stream_stats) this often.
STREAM_STATS_S = env_float("STREAM_STATS_S", 60.0)
# Streams a unit may open a minute (each open writes); beyond it the stream is closed 1013 and
# the agent polls over HTTP until it tries again.
STREAM_CONNECTS_PER_MIN = env_int("STREAM_CONNECTS_PER_MIN", 30)
# GPU readings: the latest in the cache (kept this long), and a history row per unit this often.
STREAM_TELEMETRY_TTL_S = env_int("STREAM_TELEMETRY_TTL_S", 600)
STREAM_TELEMETRY_SAMPLE_S = env_int("STREAM_TELEMETRY_SAMPLE_S", 600)
# A process that serves streams tunes its interpreter (agent_stream/server.tune_process): the
# objects it holds once up are frozen out of garbage collection, young objects are collected
# every 50,000 allocations rather than 700 (the cycles a request leaves die there) and full
# collections come a tenth as often; a thread hands the interpreter back within 1 ms, not 5.
# Services: jobs' ports reached through the relay (marketplace/jobs/relay/). A job's HTTP ports are
# served under RELAY_HTTP_PREFIX on the API host: <prefix>/<job id>/<port>/<path>.
RELAY_HTTP_PREFIX = "/services"
# Or at a host of their own, <job id>-<port>.<RELAY_SERVICE_DOMAIN> (a wildcard DNS name and
# certificate pointing at the connection servers): the job's paths then start at its root.
RELAY_SERVICE_DOMAIN = (env_str("RELAY_SERVICE_DOMAIN") or "").lower().strip(".")
RELAY_CHANNELS_PER_JOB = env_int("RELAY_CHANNELS_PER_JOB", 64)  # requests and forwards open at once
RELAY_CHANNELS_PER_UNIT = env_int("RELAY_CHANNELS_PER_UNIT", 256)
RELAY_REQUEST_MAX_BYTES = env_int("RELAY_REQUEST_MAX_BYTES", 64 * 2**20)  # a request's body
RELAY_RESPONSE_MAX_BYTES = env_int("RELAY_RESPONSE_MAX_BYTES", 2**30)  # a response's body
RELAY_IDLE_TIMEOUT_S = env_float("RELAY_IDLE_TIMEOUT_S", 60.0)  # no byte either way this long: closed
RELAY_OPEN_TIMEOUT_S = env_float("RELAY_OPEN_TIMEOUT_S", 15.0)  # the agent's answer to an open
# Where the relay's peers (the other connection server processes) reach this one for the streams
# it holds: host:port to listen on (port 0: any, each worker process its own), and the host to
# record for them (the pod's address where it listens on 0.0.0.0; by default the one bound).
RELAY_PEER_BIND = env_str("RELAY_PEER_BIND") or "127.0.0.1:0"
RELAY_PEER_ADVERTISE = env_str("RELAY_PEER_ADVERTISE") or ""
# Where this deployment of connection servers runs: an ISO 3166 country or subdivision ("DE",
# "DE-HE"). A job with relay_in_jurisdiction is served only by servers within its jurisdictions.
RELAY_LOCATION = env_str("RELAY_LOCATION") or ""

STREAM_TUNE_PROCESS = env_bool("STREAM_TUNE_PROCESS", True)
STREAM_GC_THRESHOLDS = (50_000, 20, 100)
STREAM_SWITCH_INTERVAL_S = 0.001
