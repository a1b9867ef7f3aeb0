"""Host processes a sandbox runtime leaves behind.

gVisor runs a container as host processes of its own (`runsc-sandbox`, `runsc-gofer`, named on
their command line with the container's id); after a failed start some outlive `docker rm -f`.
The agent kills whatever is left of a sandboxed job's container once it has removed it.
"""

import logging
import os
import signal
from pathlib import Path

from nodes.agent import logs

logger = logging.getLogger(__name__)


def leftovers(container_id: str, proc: Path = Path("/proc")) -> list[int]:
    """Pids of sandbox runtime processes that name this container."""
    if not container_id:
        return []
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        if (
            argv
            and Path(argv[0].decode(errors="replace")).name.startswith("runsc")
            and any(container_id.encode() in arg for arg in argv[1:])
        ):
            found.append(int(entry.name))
    return found


def reap(container_id: str, proc: Path = Path("/proc")) -> list[int]:
    """Kill what `leftovers` finds; returns the pids it signalled."""
    pids = leftovers(container_id, proc)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue  # gone, or not ours to kill
    if pids:
        logs.event(logger, "sandbox_leftovers_killed", logging.WARNING, container=container_id[:12], pids=pids)
    return pids
