"""The connection server's pool for the agents' calls takes the most urgent first: a full heartbeat
before the usage rounds and starts queued ahead of it."""

import threading

from marketplace.jobs.agent_stream import pool as work
from marketplace.jobs.agent_stream.pool import PriorityPool

WAIT_S = 10.0


def test_the_most_urgent_waiting_work_runs_first_and_in_order_within_a_priority():
    pool = PriorityPool(1, "test")
    gate, ran = threading.Event(), []
    pool.submit(gate.wait)  # holds the one thread while the rest queue
    futures = [
        pool.submit(ran.append, "usage 1", priority=work.USAGE),
        pool.submit(ran.append, "start", priority=work.CALL),
        pool.submit(ran.append, "usage 2", priority=work.USAGE),
        pool.submit(ran.append, "heartbeat", priority=work.HEARTBEAT),
    ]
    gate.set()
    for future in futures:
        future.result(WAIT_S)
    assert ran == ["heartbeat", "start", "usage 1", "usage 2"]
    pool.shutdown()


def test_an_exception_reaches_its_caller_and_the_thread_goes_on():
    pool = PriorityPool(2, "test")
    failed = pool.submit(lambda: 1 / 0)
    assert isinstance(failed.exception(WAIT_S), ZeroDivisionError)
    assert pool.submit(lambda: 42).result(WAIT_S) == 42
    pool.shutdown()
    assert all(not thread.is_alive() for thread in pool._threads)
