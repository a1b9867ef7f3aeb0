"""Runs a job's command, waits for it, and records how it ended in EXIT_FILE.

    python -I shim.py EXIT_FILE [--user UID:GID] -- COMMAND [ARG...] < ENVIRONMENT.json

The process runtime starts every job through this shim so that a job outlives the agent: a
restarted agent cannot wait() for a process it did not start, but it can read the file. It uses
the standard library only, because it runs by path under the runtime's scrubbed environment.
With --user (an agent running as root) the shim stays root, so the job cannot forge or reach the
exit file, and runs the command as that user, without supplementary groups and with umask 077.
The job's environment (the renter's variables and secrets among it) comes as a JSON object on
stdin: the shim itself never runs with variables the renter chose.
"""

import json
import os
import signal
import subprocess
import sys
import time
from types import FrameType

USAGE = "usage: shim.py EXIT_FILE [--user UID:GID] -- COMMAND [ARG...]"
CANNOT_RUN = 127  # what a shell answers for a command it cannot execute
signalled: list[int] = []


def main(argv: list[str]) -> int:
    user: tuple[int, int] | None = None
    if len(argv) > 2 and argv[1] == "--user":
        uid, _, gid = argv[2].partition(":")
        user, argv = (int(uid), int(gid)), [argv[0], *argv[3:]]
    if len(argv) < 3 or argv[1] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    exit_file, command = argv[0], argv[2:]
    # The agent signals the job's whole process group, shim included; the shim must live on to
    # record the exit. A handler, not SIG_IGN, because an ignored signal is inherited by the job.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _carry_on)
    env = json.loads(sys.stdin.buffer.read())
    # Told to stop before the job even began: it never runs.
    code = 128 + signalled[0] if signalled else run(command, env, user)
    record(exit_file, code)
    return code


def run(command: list[str], env: dict[str, str], user: tuple[int, int] | None = None) -> int:
    drop = {"user": user[0], "group": user[1], "extra_groups": [], "umask": 0o077} if user else {}
    try:
        code = subprocess.call(command, env=env, stdin=subprocess.DEVNULL, **drop)
    except OSError as exc:
        print(f"shedshare: cannot run {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        return CANNOT_RUN
    return 128 - code if code < 0 else code


def record(path: str, code: int) -> None:
    """Write the exit file atomically, so a reader never sees half of it."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"exit_code": code, "exited_at": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _carry_on(signum: int, frame: FrameType | None) -> None:
    signalled.append(signum)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
