"""Settings of a deployment: the shared base, and with DEBUG off, HTTPS only (redirect, HSTS,
secure cookies) and mail that never lands in a log. ``manage.py``, WSGI, ASGI and Celery default
to these; ``manage.py check --deploy`` with them prints no warning (tests/kernel/test_settings.py).

A deployment that serves plain HTTP on purpose (the compose file, the end-to-end tests) says so
with SECURE_SSL_REDIRECT=false and SECURE_COOKIES=false; one behind a TLS-terminating proxy names
the header the proxy sets with SECURE_PROXY_SSL_HEADER (e.g. X-Forwarded-Proto)."""

from marketplace.kernel.env import env_bool, env_int, env_str
from marketplace.settings.base import *  # noqa: F403
from marketplace.settings.base import DEBUG, EMAIL_BACKEND

if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    # Probes (the kubelet's; the liveness sweep's LIVENESS_PROBE_URL inside a cluster) speak plain
    # HTTP to a pod: answered there, not redirected (a probe counts a redirect as an answer).
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
    SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)
    CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
    # Browsers remember for a year to come only over HTTPS (sent on HTTPS responses only).
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    # Only a proxy that overwrites this header may be trusted with it: anyone can send it.
    _proxy_header = env_str("SECURE_PROXY_SSL_HEADER", "")
    if _proxy_header:
        SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_header.upper().replace("-", "_"), "https")

    # Mail goes out only through a configured server; the console and file backends would write
    # password-reset links (a takeover of the account) to the logs, so they count as none.
    MAIL_CONFIGURED = EMAIL_BACKEND not in {
        "django.core.mail.backends.console.EmailBackend",
        "django.core.mail.backends.filebased.EmailBackend",
        "django.core.mail.backends.dummy.EmailBackend",
        "django.core.mail.backends.locmem.EmailBackend",
    }
    if not MAIL_CONFIGURED:
        EMAIL_BACKEND = "django.core.mail.backends.dummy.EmailBackend"
