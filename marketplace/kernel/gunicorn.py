"""The worker class gunicorn runs the ASGI application with (the image's and devstack's web server)."""

from uvicorn_worker import UvicornWorker


class Worker(UvicornWorker):
    """uvicorn's worker, with the WebSocket settings the agents' streams want.

    - ``websockets-sansio``: uvicorn's newer WebSocket implementation, which keeps no task or
      stream reader per connection, so an idle stream costs a timer rather than wake-ups.
    - No pings from the server: each agent heartbeats at least every HEARTBEAT_IDLE_INTERVAL_S
      and pings on its own (nodes/agent/stream.py), and a stream silent for STREAM_SILENT_S is
      closed by the hub, so a server ping would prove nothing more while costing one frame each
      way per stream every 20 s (10,000 streams: 1,000 frames a second).
    """

    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "ws": "websockets-sansio", "ws_ping_interval": None}
