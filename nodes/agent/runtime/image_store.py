"""The images the Docker runtime pulled, kept on disk, and their pruning once unused.

Only images the agent pulled are ever removed: an image the owner had before is not in the
record. They are removed by the reference that was pulled, so a tag the owner added stays; and
never by force, so the engine keeps any image a container still uses.

An image pulled with a renter's registry credential is marked private (the credential itself is
never kept), so that no other job runs it without a pull of its own.
"""

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodes.agent import files, logs
from nodes.agent.images import ImagePolicy

logger = logging.getLogger(__name__)
FILENAME = "images.json"


class PulledImages:
    """{reference: {"id", "size", "last_used", "private"}} of the images the agent pulled,
    `last_used` in Unix time. Pulls finish and pruning runs in background threads, hence the lock."""

    def __init__(self, folder: Path | None, *, wall: Callable[[], float] = time.time) -> None:
        self._path = folder / FILENAME if folder else None
        self._wall = wall
        self._lock = threading.Lock()
        self._images: dict[str, dict[str, Any]] = self._load()

    @property
    def images(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {reference: dict(image) for reference, image in self._images.items()}

    def pulled(self, reference: str, image_id: str, size: int, *, private: bool = False) -> None:
        with self._lock:
            self._images[reference] = {"id": image_id, "size": size, "last_used": self._wall(), "private": private}
            self._save()

    def private(self, image_id: str) -> bool:
        """Whether the agent pulled this image, by any reference, with a registry credential."""
        with self._lock:
            return any(image["id"] == image_id and image.get("private") for image in self._images.values())

    def used(self, reference: str, at: float | None = None) -> None:
        with self._lock:
            if reference in self._images:
                self._images[reference]["last_used"] = self._wall() if at is None else at
                self._save()

    def forget(self, reference: str) -> None:
        with self._lock:
            if self._images.pop(reference, None) is not None:
                self._save()

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._path is None or not self._path.exists():
            return {}
        try:
            data = files.read_json(self._path)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        if self._path is not None:
            files.private_dir(self._path.parent)
            files.write_json(self._path, self._images)


def prune(client: Any, record: PulledImages, policy: ImagePolicy, now: float) -> list[str]:
    """Remove the pulled images no container uses that have not been used for `image_keep_hours`,
    then the least recently used unused ones while they hold more than `image_disk_mb`; returns
    the references removed."""
    in_use = {container.attrs.get("Image") for container in client.containers.list(all=True)}
    images = record.images
    for reference, image in images.items():
        if image["id"] in in_use:
            image["last_used"] = now  # a running job's image is as fresh as it gets
            record.used(reference, at=now)
    idle = sorted((image["last_used"], reference) for reference, image in images.items() if image["id"] not in in_use)
    keep_s = policy.image_keep_hours * 3600
    held = sum(int(image.get("size", 0)) for image in images.values())
    removed = []
    for last_used, reference in idle:
        if now - last_used < keep_s and held <= policy.image_disk_mb * 2**20:
            break  # the rest were used more recently still
        if _remove(client, reference, record):
            removed.append(reference)
            held -= int(images[reference].get("size", 0))
    return removed


def _remove(client: Any, reference: str, record: PulledImages) -> bool:
    from docker.errors import APIError, ImageNotFound

    try:
        client.images.remove(image=reference)
    except ImageNotFound:
        record.forget(reference)  # someone removed it already
        return True
    except APIError as exc:  # a container still uses it (409), or the engine is busy: next time
        logs.event(logger, "image_prune_failed", logging.WARNING, image=reference, error=exc)
        return False
    record.forget(reference)
    logs.event(logger, "image_pruned", image=reference)
    return True
