"""Django's PostgreSQL backend, failing fast while the database cannot be reached.

When opening a connection fails (refused, timed out, or no pooled connection within the pool's
timeout), the process stops trying for DB_UNREACHABLE_HOLD_S: each request in that time fails at
once (an OperationalError, which marketplace.kernel.outages answers with 503 and Retry-After)
instead of waiting for a connection. Without the hold, every request would wait out the timeout
in turn, and an ASGI worker (which runs requests' database work in one thread) would answer
nothing at all: not the 503 that tells agents and clients to come back, not its long polls.
"""

import threading
import time

import psycopg
from django.conf import settings
from django.db.backends.postgresql import base

_lock = threading.Lock()
_unreachable_until = 0.0  # per process: monotonic time before which no connection is tried


def hold_remaining() -> float:
    return max(0.0, _unreachable_until - time.monotonic())


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        global _unreachable_until  # noqa: PLW0603 - one hold shared by the process's threads
        if hold_remaining():
            raise psycopg.OperationalError("The database could not be reached a moment ago; not trying again yet.")
        try:
            return super().get_new_connection(conn_params)
        except psycopg.OperationalError:  # psycopg_pool's PoolTimeout is one too
            with _lock:
                _unreachable_until = time.monotonic() + settings.DB_UNREACHABLE_HOLD_S
            raise
