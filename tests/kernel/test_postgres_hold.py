"""While the database cannot be reached, a process answers at once instead of waiting out a
connection timeout for every request (marketplace.kernel.postgres)."""

import time

import pytest
from django.db import connection
from psycopg import OperationalError

from marketplace.kernel.postgres import base as postgres
from tests.e2e import free_port
from tests.servers import Postgres


@pytest.fixture
def connect(monkeypatch, settings):
    """Opening a connection to a port nothing listens on, with a fresh hold."""
    settings.DB_UNREACHABLE_HOLD_S = 30
    monkeypatch.setattr(postgres, "_unreachable_until", 0.0)
    params = {
        **connection.settings_dict, "ENGINE": "marketplace.kernel.postgres", "NAME": "shedshare", "USER": "postgres",
        "HOST": "127.0.0.1", "PORT": str(free_port()), "OPTIONS": {"connect_timeout": 2},
    }  # fmt: skip
    wrapper = postgres.DatabaseWrapper(params, alias="unreachable")
    return lambda: wrapper.get_new_connection(wrapper.get_connection_params())


def test_after_one_failed_connection_the_next_fail_at_once_until_the_hold_ends(connect, monkeypatch):
    with pytest.raises(OperationalError, match="refused|failed"):
        connect()
    assert 29 < postgres.hold_remaining() <= 30

    began = time.monotonic()
    for _ in range(50):
        with pytest.raises(OperationalError, match="a moment ago"):
            connect()
    assert time.monotonic() - began < 1  # not one wait among them

    monkeypatch.setattr(postgres, "_unreachable_until", 0.0)  # the hold is over: it tries again
    with pytest.raises(OperationalError, match="refused|failed"):
        connect()


@pytest.mark.slow
def test_a_pool_left_backing_off_after_an_outage_is_replaced_once_the_database_answers(monkeypatch, settings):
    """psycopg_pool retries a lost connection with a doubling delay; after the database is back,
    the next connection must not wait for that delay to run out."""
    settings.DB_UNREACHABLE_HOLD_S = 1
    monkeypatch.setattr(postgres, "_unreachable_until", 0.0)
    monkeypatch.setattr(postgres, "_recovering", False)
    server = Postgres()
    params = {
        **connection.settings_dict, "ENGINE": "marketplace.kernel.postgres", "NAME": "test", "USER": "postgres",
        "HOST": "127.0.0.1", "PORT": str(server.port), "CONN_MAX_AGE": 0,
        "OPTIONS": {"connect_timeout": 2, "pool": {"min_size": 1, "max_size": 2, "timeout": 1}},
    }  # fmt: skip
    wrapper = postgres.DatabaseWrapper(params, alias="outage")
    connect = lambda: wrapper.get_new_connection(wrapper.get_connection_params())  # noqa: E731
    try:
        connect().close()
        server.stop()
        for _ in range(6):  # about 6 s of the outage: the pool's delay grows meanwhile
            with pytest.raises(OperationalError):
                connect()
            time.sleep(1)
        server.start()
        time.sleep(settings.DB_UNREACHABLE_HOLD_S)

        began = time.monotonic()
        connect().close()
        assert time.monotonic() - began < 5  # the pool timeout and a fresh pool, not its backoff
    finally:
        wrapper.close_pool()
        server.close()
