"""Django's PostgreSQL backend, failing fast while the database cannot be reached and coming
back as soon as it does.

- **A hold.** When opening a connection fails (refused, timed out, or no pooled connection within
  the pool's timeout), the process stops trying for DB_UNREACHABLE_HOLD_S: each request in that
  time fails at once (an OperationalError, which marketplace.kernel.outages answers with 503 and
  Retry-After) instead of waiting for a connection. Without it, every request would wait out the
  timeout in turn, and an ASGI worker (which runs requests' database work in one thread) would
  answer nothing at all: not the 503 that tells agents and clients to come back, not its long polls.
- **A fresh pool after an outage.** psycopg_pool retries a lost connection with a doubling delay
  (16 s and more after a 20 s outage), so a pool can still be waiting long after the database is
  back. After an outage, when the pool gives no connection but the database answers a direct
  connection, the pool is replaced: the next request is served at once.
"""

import logging
import threading
import time

import psycopg
from django.conf import settings
from django.db.backends.postgresql import base
from psycopg_pool import PoolTimeout

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_unreachable_until = 0.0  # per process: monotonic time before which no connection is tried
_recovering = False  # per process: the database was found unreachable since the last connection


def hold_remaining() -> float:
    return max(0.0, _unreachable_until - time.monotonic())


def _unreachable() -> None:
    global _unreachable_until, _recovering  # noqa: PLW0603 - one state shared by the process's threads
    with _lock:
        _unreachable_until = time.monotonic() + settings.DB_UNREACHABLE_HOLD_S
        _recovering = True


def _reached() -> None:
    global _recovering  # noqa: PLW0603
    _recovering = False


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        if hold_remaining():
            raise psycopg.OperationalError("The database could not be reached a moment ago; not trying again yet.")
        try:
            connection = super().get_new_connection(conn_params)
        except PoolTimeout:
            if not self._database_answers(conn_params):
                _unreachable()
                raise
            if not _recovering:
                raise  # every pooled connection is busy: the database is not away, so no hold
            self._pool_replace()
            connection = super().get_new_connection(conn_params)
        except psycopg.OperationalError:
            _unreachable()
            raise
        _reached()
        return connection

    def _database_answers(self, conn_params) -> bool:
        try:
            self.Database.connect(**conn_params).close()
        except psycopg.Error:
            return False
        return True

    def _pool_replace(self) -> None:
        with _lock:
            stale = self._connection_pools.pop(self.alias, None)
        if stale is not None:
            logger.warning("db_pool_replaced: the database is back; the old pool was still backing off")
            stale.close(timeout=0)
