import os

from django.core.asgi import get_asgi_application

# Each request runs its synchronous part in a thread of its own under ASGI, so a kept database
# connection would outlive its thread: Django's advice is to close them after each request, and
# on PostgreSQL to take them from a pool instead.
os.environ.setdefault("DB_CONN_MAX_AGE", "0")
os.environ.setdefault("DB_POOL", "true")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings.production")

django_application = get_asgi_application()

# Need the apps loaded:
from marketplace.jobs.agent_stream.server import relay_application, shutdown, stream_application  # noqa: E402
from marketplace.kernel.asgi import body_limit, with_websockets  # noqa: E402
from marketplace.ops import telemetry  # noqa: E402
from nodes.agent.protocol import API_PREFIX, STREAM  # noqa: E402

telemetry.start("web")

# HTTP for the API, the portal and the agents' fallback; the agents' streams as WebSockets; jobs'
# ports (their HTTP under RELAY_HTTP_PREFIX, any port as a WebSocket tunnel) through the relay.
application = relay_application(
    with_websockets(
        body_limit(django_application), {f"{API_PREFIX}/{STREAM}": stream_application}, on_shutdown=shutdown
    )
)
