"""The embedded default's broker (marketplace/kernel/broker.py): with several processes writing
and reading one folder at once, every message arrives whole, exactly once."""

import multiprocessing
from queue import Empty

from kombu import Connection

from marketplace.kernel.broker import Transport

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
