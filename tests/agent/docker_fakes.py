"""A fake of the few Docker SDK calls the Docker runtime makes, with the SDK's own exceptions."""

import hashlib
import threading
from typing import Any

from docker.errors import APIError, ImageNotFound, NotFound


class FakeContainer:
    def __init__(self, engine: "FakeDocker", kwargs: dict[str, Any]) -> None:
        self.engine = engine
        self.kwargs = kwargs
        self.id = f"{len(engine.created):064x}"
        self.status = "created"
        self.attrs: dict[str, Any] = {
            "State": {"ExitCode": 0, "FinishedAt": "0001-01-01T00:00:00Z"},
            "Image": engine.image(kwargs["image"]).id,
        }
        self.output = list(engine.output)
        self.signals: list[str] = []
        self.exited = threading.Event()

    def start(self) -> None:
        if self.engine.fail_start:
            raise APIError('could not select device driver "nvidia"')
        self.status = "running"

    def reload(self) -> None:
        pass

    def exit(self, code: int, finished_at: str = "2025-01-02T03:04:05.123456789Z") -> None:
        self.status = "exited"
        self.attrs["State"] = {"ExitCode": code, "FinishedAt": finished_at}
        self.exited.set()

    def kill(self, signal: str = "SIGKILL") -> None:
        self.signals.append(signal)
        if signal == "SIGKILL" or not self.engine.ignore_sigterm:
            self.exit(137 if signal == "SIGKILL" else 143)

    def remove(self, force: bool = False) -> None:
        self.engine.removed.append((self.kwargs["name"], force))
        self.engine.by_name.pop(self.kwargs["name"], None)

    def logs(self, **kwargs: Any):
        assert kwargs["stream"] and kwargs["follow"]
        yield from self.output
        self.exited.wait(5)  # like the engine: a followed stream ends with the container


class FakeImage:
    def __init__(self, name: str, size: int, digest: str | None) -> None:
        self.id = f"sha256:{abs(hash(name)):064x}"[:71]
        self.attrs = {"Size": size, "RepoDigests": [f"{repository(name)}@{digest}"] if digest else []}


def repository(name: str) -> str:
    """The reference without its tag or digest, as RepoDigests names it."""
    name = name.partition("@")[0]
    head, slash, last = name.rpartition("/")
    return head + slash + last.partition(":")[0]


def digest_of(name: str) -> str:
    """What the registry serves for `name`: its pinned digest, or one made up from the name."""
    pinned = name.partition("@")[2]
    return pinned or f"sha256:{hashlib.sha256(name.encode()).hexdigest()}"


class _Images:
    def __init__(self, engine: "FakeDocker") -> None:
        self.engine = engine

    def get(self, name: str) -> FakeImage:
        if name not in self.engine.local_images:
            raise ImageNotFound(f"No such image: {name}")
        return self.engine.image(name)

    def pull(self, name: str, auth_config: dict[str, str] | None = None) -> FakeImage:
        self.engine.pulls.append(name)
        self.engine.pull_auth.append(auth_config)
        assert self.engine.pull_release.wait(5)
        if self.engine.pull_error:
            raise APIError(self.engine.pull_error)
        required = self.engine.private_images.get(name)
        if required is not None and auth_config != required:
            raise APIError(f"pull access denied for {repository(name)}: requested access to the resource is denied")
        self.engine.local_images.add(name)
        return self.engine.image(name)

    def remove(self, image: str) -> None:
        in_use = {c.kwargs["image"] for c in self.engine.by_name.values()}
        if image not in self.engine.local_images:
            raise ImageNotFound(f"No such image: {image}")
        if image in in_use:
            raise APIError(f"conflict: unable to remove {image}: image is being used by a container")
        self.engine.local_images.discard(image)
        self.engine.removed_images.append(image)


class _Containers:
    def __init__(self, engine: "FakeDocker") -> None:
        self.engine = engine

    def create(self, **kwargs: Any) -> FakeContainer:
        self.engine.images.get(kwargs["image"])  # like the engine: no image, no container
        container = FakeContainer(self.engine, kwargs)
        self.engine.created.append(container)
        self.engine.by_name[kwargs["name"]] = container
        return container

    def list(self, all: bool = False) -> list[FakeContainer]:  # noqa: A002 - the SDK's name
        assert all, "the runtime must see stopped containers too: they still hold their image"
        return list(self.engine.by_name.values())

    def get(self, name: str) -> FakeContainer:
        if name not in self.engine.by_name:
            raise NotFound(f"No such container: {name}")
        return self.engine.by_name[name]


class FakeNetwork:
    def __init__(self, name: str, options: dict[str, str], driver: str = "bridge") -> None:
        self.name = name
        self.attrs = {"Name": name, "Id": f"{abs(hash(name)):064x}", "Driver": driver, "Options": options}


class _Networks:
    def __init__(self, engine: "FakeDocker") -> None:
        self.engine = engine

    def list(self, names: list[str]) -> list[FakeNetwork]:
        # Like the engine, a prefix matches as well as the whole name.
        found = [name for name in self.engine.bridges if any(name.startswith(n) for n in names)]
        return [FakeNetwork(name, self.engine.bridges[name].get("options", {})) for name in found]

    def create(self, name: str, **kwargs: Any) -> FakeNetwork:
        self.engine.bridges[name] = kwargs
        return FakeNetwork(name, kwargs.get("options", {}))


class FakeDocker:
    def __init__(self, images: tuple[str, ...] = ("python:3.12-slim",)) -> None:
        self.local_images = set(images)
        self.image_sizes: dict[str, int] = {}  # bytes, by reference; 100 MB when not given
        self.removed_images: list[str] = []
        self.created: list[FakeContainer] = []
        self.by_name: dict[str, FakeContainer] = {}
        self.removed: list[tuple[str, bool]] = []
        self.bridges: dict[str, dict[str, Any]] = {}
        self.pulls: list[str] = []
        self.pull_auth: list[dict[str, str] | None] = []  # the auth_config of each pull, in order
        # Images the registry serves only with this auth_config; by reference.
        self.private_images: dict[str, dict[str, str]] = {}
        # Repo digests by reference, where not digest_of(reference); None: built here, without one.
        self.digests: dict[str, str | None] = {}
        self.output = [b"hello from a container\n"]  # what each container writes
        self.pull_release = threading.Event()
        self.pull_release.set()
        self.pull_error = ""
        self.fail_start = False
        self.ignore_sigterm = False
        self.containers = _Containers(self)
        self.images = _Images(self)
        self.networks = _Networks(self)

    def image(self, name: str) -> FakeImage:
        return FakeImage(name, self.image_sizes.get(name, 100 * 2**20), self.digests.get(name, digest_of(name)))

    def info(self) -> dict[str, Any]:
        return {"Runtimes": {"runc": {}}}
