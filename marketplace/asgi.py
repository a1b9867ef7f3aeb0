import os

from django.core.asgi import get_asgi_application

# Each request runs its synchronous part in a thread of its own under ASGI, so a kept database
# connection would outlive its thread: Django's advice is to close them after each request, and
# on PostgreSQL to take them from a pool instead.
os.environ.setdefault("DB_CONN_MAX_AGE", "0")
os.environ.setdefault("DB_POOL", "true")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings.production")

django_application = get_asgi_application()

from marketplace.kernel.asgi import body_limit  # noqa: E402 - needs the apps loaded

application = body_limit(django_application)
