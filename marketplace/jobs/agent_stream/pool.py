"""A pool of threads that takes the most urgent work first: the connection server's pool for the
agents' calls, where a full heartbeat (the unit's liveness and state) must not wait behind the
usage reports and job starts a busy fleet queues (``Hub.db``'s ``priority``)."""

import heapq
import itertools
import threading
from concurrent.futures import Future

HEARTBEAT = 0  # a full heartbeat: what keeps the unit alive and its state agreed
CALL = 1  # the agent's other calls (starts, finishes, logs), admissions, lost streams
USAGE = 2  # usage rounds: samples keep, and an agent resends what was not answered
LAST = 9  # after everything queued (the threads' goodbyes at shutdown)


class PriorityPool:
    """``submit(fn, priority=…)`` returns a Future; lower priorities run first, each in the
    order it came. ``shutdown`` lets the threads finish what is queued, then end."""

    def __init__(self, threads: int, name: str) -> None:
        self._queue: list = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{n}", daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, *args, priority: int = CALL) -> Future:
        future: Future = Future()
        with self._ready:
            if self._stopped:
                raise RuntimeError("the pool is shut down")
            heapq.heappush(self._queue, (priority, next(self._order), future, fn, args))
            self._ready.notify()
        return future

    def shutdown(self, wait: bool = True) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopped:
                    self._ready.wait()
                if not self._queue:
                    return
                _, _, future, fn, args = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the caller's to handle
                future.set_exception(exc)
