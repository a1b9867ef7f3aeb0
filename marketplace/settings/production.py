"""Settings of a deployment: the shared base, and with DEBUG off, cookies only over TLS behind a
proxy that says so. ``manage.py``, WSGI, ASGI and Celery default to these."""

from marketplace.kernel.env import env_bool
from marketplace.settings.base import *  # noqa: F403
from marketplace.settings.base import DEBUG

if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)
    CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
