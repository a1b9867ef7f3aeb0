"""Durable little files for the agent's state: written whole or not at all, readable by the owner only."""

import json
import os
from pathlib import Path
from typing import Any


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # mkdir's mode is only used when the folder is new
    return path


def write_json(path: Path, data: Any) -> None:
    """Replace `path` atomically: after a crash it holds either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def sync_dir(path: Path) -> None:
    # A rename is durable only once the folder that holds the name is flushed too.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def clear_temporaries(folder: Path) -> None:
    """Half-written files from a crash in the middle of `write_json`."""
    for tmp in folder.glob(".*.tmp"):
        remove(tmp)
