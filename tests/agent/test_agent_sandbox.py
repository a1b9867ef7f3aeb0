"""The sandbox runtime's processes left on the host after its container is removed."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from nodes.agent.runtime import sandbox

CONTAINER = "4f1c" + "0" * 60


def proc_with(tmp_path: Path, processes: dict[int, list[str]]) -> Path:
    """A stand-in for /proc: one folder per pid with its NUL-separated command line."""
    for pid, argv in processes.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (tmp_path / "self").mkdir()  # not a pid
    return tmp_path


def test_only_runsc_processes_naming_the_container_are_leftovers(tmp_path):
    proc = proc_with(
        tmp_path,
        {
            10: ["/usr/bin/runsc", "--root=/var/run/docker/runtime-runsc/moby", "gofer", f"--bundle=/x/{CONTAINER}"],
            11: ["runsc-sandbox", "boot", CONTAINER],
            12: ["/usr/bin/runsc", "boot", "0" * 64],  # another container's sandbox
            13: ["sleep", CONTAINER],  # not the sandbox runtime
            14: ["containerd-shim-runc-v2", "-id", CONTAINER],  # runc's shim: the engine's own business
        },
    )

    assert sorted(sandbox.leftovers(CONTAINER, proc)) == [10, 11]
    assert sandbox.leftovers("", proc) == []


def test_reap_kills_the_leftovers(tmp_path):
    # A real process whose command line names runsc and the container, as a stand-in.
    child = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", "import time; time.sleep(60)", "runsc-gofer", CONTAINER],
        executable=sys.executable,
    )
    try:
        proc = tmp_path / "proc"
        (proc / str(child.pid)).mkdir(parents=True)
        (proc / str(child.pid) / "cmdline").write_bytes(b"\0".join([b"/usr/bin/runsc", b"gofer", CONTAINER.encode()]))

        assert sandbox.reap(CONTAINER, proc) == [child.pid]
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
