"""The brokers' transports (marketplace/kernel/broker.py): the embedded default's, with several
processes writing and reading one folder at once, delivers every message whole, exactly once;
the Redis one lets a worker outlive Redis going away."""

import multiprocessing
from queue import Empty

import pytest
import redis.exceptions as redis_errors
from kombu import Connection
from kombu.transport import redis as redis_transport

from marketplace.kernel.broker import RedisTransport, Transport
from tests.servers import Redis

# Large enough messages, and enough of them, that kombu's own transport tears some (a reader
# takes a file its writer has not filled yet: JSONDecodeError) on every run seen here.
WRITERS, READERS, EACH = 2, 4, 1000


def connection(folder) -> Connection:
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder)}
    return Connection("filesystem://", transport=Transport, transport_options=options)


def write(folder, writer: int) -> None:
    with connection(folder) as conn:
        queue = conn.SimpleQueue("work")
        for n in range(EACH):
            queue.put({"writer": writer, "n": n, "padding": "x" * 50_000})
        queue.close()


def read(folder, results, done) -> None:
    """Take messages until the writers are done and the queue is empty; report what was taken."""
    taken, errors = [], []
    with connection(folder) as conn:
        queue = conn.SimpleQueue("work")
        while True:
            try:
                message = queue.get(timeout=0.05)
            except Empty:
                if done.is_set():
                    break
                continue
            except Exception as exc:  # a torn message would land here
                errors.append(repr(exc))
                continue
            taken.append((message.payload["writer"], message.payload["n"]))
            message.ack()
        queue.close()
    results.put((taken, errors))


def test_every_message_arrives_whole_and_exactly_once_with_concurrent_writers_and_readers(tmp_path):
    context = multiprocessing.get_context("fork")
    results, done = context.Queue(), context.Event()
    readers = [context.Process(target=read, args=(tmp_path, results, done)) for _ in range(READERS)]
    writers = [context.Process(target=write, args=(tmp_path, n)) for n in range(WRITERS)]
    for process in readers + writers:
        process.start()
    for writer in writers:
        writer.join(timeout=120)
    done.set()
    reports = [results.get(timeout=120) for _ in readers]
    for reader in readers:
        reader.join(timeout=30)

    taken = [message for messages, _ in reports for message in messages]
    assert [errors for _, errors in reports] == [[]] * READERS
    assert sorted(taken) == sorted((writer, n) for writer in range(WRITERS) for n in range(EACH))


@pytest.fixture
def private_redis():
    server = Redis()
    yield server
    server.stop()


def consumer_loses_redis(server: Redis, transport) -> None:
    """The steps of Celery's consumer when Redis goes away while it holds a message it has not
    acknowledged and waits for the next (a BRPOP in flight): ``collect`` closes the channel, which
    fails on the dead socket (and is ignored), then drops the connection's address; closing the
    connection then closes the channel again, restoring the message."""
    conn = Connection(server.url, transport=transport)
    queue = conn.SimpleQueue("work")
    queue.put({"n": 1})
    assert queue.get(timeout=10).payload == {"n": 1}  # delivered, not acknowledged
    channel = conn.default_channel
    channel._brpop_start()  # waiting for the next, as the worker's event loop does
    server.stop()
    with pytest.raises(redis_errors.ConnectionError):
        channel.close()
    conn._do_close_transport()
    channel.close()


def test_a_redis_consumer_that_loses_the_server_holding_a_message_closes_cleanly(private_redis):
    consumer_loses_redis(private_redis, RedisTransport)  # no AttributeError: the worker lives on


def test_kombus_own_redis_transport_still_dies_there(private_redis):
    """The fault RedisTransport mends; when a kombu release fixes it, this fails: drop the mend."""
    with pytest.raises(AttributeError, match="hostname"):
        consumer_loses_redis(private_redis, redis_transport.Transport)
