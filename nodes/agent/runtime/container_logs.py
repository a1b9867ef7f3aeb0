"""Background work for the Docker runtime: pulling images and following containers' output.

Daemon threads, so that neither a long pull nor a job that outlives the agent holds up its exit.
"""

import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

LOG_LIMIT_BYTES = 256 * 2**20


def in_background(name: str, work: Callable[[], Any]) -> Future[Any]:
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to whoever polls the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def follow(container: Any, log_path: Path, since: float | None = None) -> Future[Any]:
    """Append the container's output to the allocation's log file as it comes, so it is shipped
    while the job runs; the future ends when the container does."""
    return in_background(f"logs-{container.id[:12]}", lambda: _copy(container, log_path, since))


def _copy(container: Any, log_path: Path, since: float | None) -> None:
    written = 0
    with open(log_path, "ab", buffering=0) as log:
        try:
            for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=True, since=since):
                if written + len(chunk) > LOG_LIMIT_BYTES:
                    log.write(b"\nshedshare: output truncated\n")
                    return
                log.write(chunk)
                written += len(chunk)
        except Exception as exc:  # the container was removed or the engine went away
            log.write(f"\nshedshare: lost the container's output: {exc}\n".encode())
