"""Runs a job's image in a hardened container through the Docker SDK (see `spec.py`).

Like the process runtime it never blocks the loop for long: the job's image is brought here by
`pull` before the start, in the background, so that the start can name its digest; an engine that
loses a running container ends the job with exit code 125, the code `docker run` itself uses when
the engine cannot run a container. Containers are named and labelled after their allocation, so a
restarted agent adopts them again.

An image already here is used as it is, except for a job with a registry credential, whose image
is pulled with that credential (so that the registry checks this renter's right to it) unless the
job is pinned to a digest the copy here carries; and except for an image the agent pulled with a
credential, which no job uses without pulling it again. The credential goes with that one pull
(the engine's X-Registry-Auth), never to a file, the engine's configuration or a log.

The registry was checked against the owner's policy before the job was accepted (`images.py`).
What the renter reads about a pull says which rule failed, or only that the pull failed: the
engine's own answer (a registry's error, a refused connection) goes to the owner's log, so that
image names cannot be used to probe the owner's network. An image over the owner's size cap is
refused and removed, and the images the agent pulled are pruned once unused.
"""

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nodes.agent import imageref, logs
from nodes.agent.egress import (
    EgressGuard,
    EgressUnavailable,
    JobNetworkGuard,
    bridge_of,
    job_network_options,
    network_options,
)
from nodes.agent.images import ImagePolicy, size_problem
from nodes.agent.isolation import IsolationConfig
from nodes.agent.protocol import RunsIn
from nodes.agent.runtime import Adopted, Handle, JobSpec, RuntimeUnavailable, StartFailed
from nodes.agent.runtime.container_logs import follow, in_background
from nodes.agent.runtime.environment import NO_SECRETS, RegistryCredential, Secrets, redact
from nodes.agent.runtime.image_store import PulledImages, prune
from nodes.agent.runtime.job_user import JobUser, hand_over
from nodes.agent.runtime.process import SAFE_ID
from nodes.agent.runtime.sandbox import reap
from nodes.agent.runtime.spec import (
    ANY_HOST,
    JOB_NETWORK_PREFIX,
    NOBODY_ID,
    GpuRequest,
    Host,
    SpecError,
    container_name,
    container_spec,
    job_network,
    network_mode,
    sandboxed,
)

ENGINE_FAILED = 125
LOG_DRAIN_S = 2.0
ENDED = ("exited", "dead")
PRUNE_EVERY_S = 600.0
PULL_FAILED = "cannot pull {image}: the pull failed (the engine's answer is in the unit owner's log)"
logger = logging.getLogger(__name__)


@dataclass
class DockerHandle:
    spec: JobSpec
    log_path: Path
    # Both hold the values of the job's secrets: never shown.
    kwargs: dict[str, Any] | None = field(default=None, repr=False)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    container: Any = None
    output: Future[Any] | None = None
    failed: str | None = None
    kill_deadline: float | None = None


def connect(sandbox_runtime: str = "") -> Any:
    """A client for the local engine, or RuntimeUnavailable saying why there is none."""
    try:
        import docker
    except ImportError:
        docker = None
    # Run from a source checkout without the package, "docker" resolves to the repository's
    # docker/ folder (a namespace package), which has no client in it.
    if not hasattr(docker, "from_env"):
        raise RuntimeUnavailable("the docker package is not installed (pip install shedshare-agent)")
    try:
        client = docker.from_env(max_pool_size=64)  # one streaming connection per running job
        runtimes = client.info().get("Runtimes") or {}
    except docker.errors.DockerException as exc:
        raise RuntimeUnavailable(f"no Docker engine: {exc}") from None
    if sandbox_runtime and sandbox_runtime not in runtimes:
        # Better to stop here than to start sandboxed jobs that fail one by one.
        raise RuntimeUnavailable(f"the engine has no {sandbox_runtime!r} runtime (it has {', '.join(runtimes)})")
    return client


def host_of(client: Any, *, simulated: bool) -> Host:
    """The machine behind the engine: its CPUs bound every job's CPU limit; simulated GPUs
    cannot be requested from it."""
    cpus = client.info().get("NCPU")
    return Host(cpus=float(cpus) if cpus else None, gpus=not simulated)


def egress_guard(client: Any, cfg: IsolationConfig) -> EgressGuard:
    """The unit's egress bridge, made if missing, with its rules in place; RuntimeUnavailable
    saying what is wrong when jobs on it could reach the host or a private network."""
    try:
        network = _egress_network(client, cfg.egress_network)
        guard = EgressGuard(bridge_of(network))
        guard.ensure()
    except EgressUnavailable as exc:
        raise RuntimeUnavailable(
            f"egress cannot be kept off the host and private networks: {exc}; fix that, or set allow_egress=false"
        ) from None
    return guard


def _egress_network(client: Any, name: str) -> Any:
    found = client.networks.list(names=[name])
    exact = [network for network in found if network.name == name]
    return exact[0] if exact else client.networks.create(**network_options(name))


class DockerRuntime:
    def __init__(
        self,
        client: Any,
        cfg: IsolationConfig,
        log_dir: Path,
        *,
        kill_grace_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        images: ImagePolicy | None = None,
        pulled: PulledImages | None = None,
        wall: Callable[[], float] = time.time,
        host: Host = ANY_HOST,
        egress: EgressGuard | None = None,
        scratch_dir: Path | None = None,
        job_networks: JobNetworkGuard | None = None,
    ) -> None:
        """`scratch_dir`: where jobs' staged data is kept on this machine; None: nowhere, so
        a job with data fails its staging."""
        self.client = client
        self.scratch_dir = scratch_dir
        self._staged: set[str] = set()  # allocations whose data is staged, to mount at the start
        self.cfg = cfg
        self.host = host
        self.egress = egress
        self.job_networks = job_networks or JobNetworkGuard()
        self.log_dir = log_dir
        self.kill_grace_s = kill_grace_s
        self.images = images or ImagePolicy()
        self.pulled = pulled or PulledImages(None, wall=wall)
        self._clock, self._wall = clock, wall
        self._next_prune_at = clock()
        self._pruning: Future[Any] | None = None

    def pull(self, spec: JobSpec, registry: RegistryCredential | None = None) -> Future[str | None]:
        """The job's image, checked against the owner's size cap and the digest the job is pinned
        to: the copy here where it may be used, else pulled. In the background either way: an
        engine under load may be slow to answer even a look-up."""
        return in_background(f"pull-{spec.allocation_id}", lambda: self._image_for(spec, registry))

    def make_scratch(self, spec: JobSpec) -> Path:
        folder = self.scratch(spec)
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        for name in ("inputs", "outputs"):
            (folder / name).mkdir(mode=0o700)
        self._staged.add(spec.allocation_id)
        return folder

    def scratch(self, spec: JobSpec) -> Path:
        if self.scratch_dir is None:
            raise OSError("this unit keeps no staged data (no scratch_dir)")
        if not SAFE_ID.fullmatch(spec.allocation_id):
            raise StartFailed(f"unsafe allocation id {spec.allocation_id!r}")
        return self.scratch_dir / spec.allocation_id

    def drop_scratch(self, spec: JobSpec) -> None:
        self._staged.discard(spec.allocation_id)
        if self.scratch_dir is not None and SAFE_ID.fullmatch(spec.allocation_id):
            shutil.rmtree(self.scratch(spec), ignore_errors=True)

    def runs_in(self, spec: JobSpec) -> str:
        return RunsIn.SANDBOX if sandboxed(spec, self.cfg) else RunsIn.CONTAINER

    def start(self, spec: JobSpec, secrets: Mapping[str, str] = NO_SECRETS) -> DockerHandle:
        """Run the job from its image, which `pull` has brought here."""
        if not SAFE_ID.fullmatch(spec.allocation_id):
            raise StartFailed(f"unsafe allocation id {spec.allocation_id!r}")
        scratch = self._hand_over(spec) if spec.allocation_id in self._staged else None
        try:
            kwargs = container_spec(spec, self.cfg, self.host, secrets, scratch)
        except SpecError as exc:
            raise StartFailed(str(exc)) from None
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = DockerHandle(spec, self.log_dir / f"{spec.allocation_id}.log", kwargs, secrets)
        self.pulled.used(spec.image)
        self._launch(handle)
        return handle

    def poll(self, handle: Handle) -> int | None:
        assert isinstance(handle, DockerHandle)
        return self._poll_container(handle)

    def kill(self, handle: Handle) -> None:
        assert isinstance(handle, DockerHandle)
        if handle.kill_deadline is None:
            handle.kill_deadline = self._clock() + self.kill_grace_s
            self._signal(handle, "SIGTERM")

    def cleanup(self, handle: Handle) -> None:
        """Keep why the engine lost the container in the allocation's log, then remove the
        container and with it its tmpfs scratch."""
        assert isinstance(handle, DockerHandle)
        if handle.failed:
            with open(handle.log_path, "ab") as log:
                log.write(f"shedshare: {handle.failed}\n".encode())
        self._remove(handle)
        self.drop_scratch(handle.spec)

    def describe(self, handle: Handle) -> dict[str, Any]:
        assert isinstance(handle, DockerHandle)
        return {"log_path": str(handle.log_path)}

    def adopt(self, spec: JobSpec, saved: dict[str, Any]) -> Adopted | None:
        from docker.errors import NotFound

        try:
            container = self.client.containers.get(container_name(spec.allocation_id))
        except NotFound:
            return None
        log_path = Path(saved["log_path"]) if saved else self.log_dir / f"{spec.allocation_id}.log"
        handle = DockerHandle(spec, log_path, container=container)
        if container.status == "created":
            container.start()  # created, not started, when the agent stopped
            container.reload()
        state = container.attrs["State"]
        started_at = _epoch(state.get("StartedAt", ""))
        if container.status not in ENDED:
            # Output from the agent's last write on; a second of it may appear twice.
            handle.output = follow(container, handle.log_path, since=_mtime(handle.log_path))
            return Adopted(handle, started_at=started_at or self._wall())
        return Adopted(
            handle,
            exit_code=int(state["ExitCode"]),
            exited_at=_epoch(state.get("FinishedAt", "")),
            started_at=started_at,
        )

    def housekeep(self) -> None:
        """Prune unused pulled images every PRUNE_EVERY_S, in the background; called every tick."""
        if self._clock() < self._next_prune_at or (self._pruning is not None and not self._pruning.done()):
            return
        self._next_prune_at = self._clock() + PRUNE_EVERY_S
        self._pruning = in_background("prune-images", self.prune)

    def prune(self) -> list[str]:
        try:
            return prune(self.client, self.pulled, self.images, self._wall())
        except Exception as exc:  # the engine went away: the next round tries again
            logs.event(logger, "image_prune_failed", logging.WARNING, error=exc)
            return []

    def _local_image(self, image: str) -> Any:
        from docker.errors import ImageNotFound

        try:
            return self.client.images.get(image)
        except ImageNotFound:
            return None

    def _image_for(self, spec: JobSpec, registry: RegistryCredential | None) -> str | None:
        try:
            ref = imageref.parse(spec.image)
        except imageref.BadReference as exc:
            raise StartFailed(str(exc)) from None
        image = self._local_image(spec.image)
        if image is not None and self._may_use(image, ref, registry):
            return self._checked(image, ref, spec.image)
        return self._pull(spec, ref, registry)

    def _may_use(self, image: Any, ref: imageref.ImageRef, registry: RegistryCredential | None) -> bool:
        """Whether the copy here may run the job without a pull (see the module's docstring)."""
        if self.pulled.private(image.id):
            return False
        return registry is None or (ref.digest is not None and ref.digest in _repo_digests(image, ref))

    def _pull(self, spec: JobSpec, ref: imageref.ImageRef, registry: RegistryCredential | None) -> str | None:
        """Pull and record the image, even for a job stopped meanwhile, so that it is pruned."""
        auth = {"auth_config": registry.auth_config()} if registry else {}
        try:
            image = self.client.images.pull(spec.image, **auth)
        except Exception as exc:  # the SDK raises several unrelated types
            error = redact(f"{type(exc).__name__}: {exc}", Secrets(registry=registry))
            logs.event(logger, "pull_failed", logging.WARNING, allocation=spec.allocation_id, error=error)
            raise StartFailed(PULL_FAILED.format(image=spec.image)) from None
        self.pulled.pulled(spec.image, image.id, _size(image), private=registry is not None)
        try:
            return self._checked(image, ref, spec.image)
        except StartFailed:
            self._remove_image(spec.image)
            raise

    def _checked(self, image: Any, ref: imageref.ImageRef, reference: str) -> str | None:
        """The image's digest in the job's repository, if it may run the job: within the owner's
        size cap, and carrying the digest the job is pinned to (the engine checks that as it pulls;
        a copy found here is checked again)."""
        problem = size_problem(_size(image), self.images)
        if problem:
            raise StartFailed(problem)
        digests = _repo_digests(image, ref)
        if ref.digest is not None and ref.digest not in digests:
            raise StartFailed(f"the image here for {reference} does not carry the digest it is pinned to")
        return ref.digest or next(iter(digests), None)

    def _hand_over(self, spec: JobSpec) -> Path:
        """The staged data's folder, given to the container's user, who reads and writes it
        through the mounts: as root by owning it; otherwise the agent cannot give a file away,
        so the folders are opened to every user (the folder above them stays the agent's own)."""
        self._staged.discard(spec.allocation_id)
        folder = self.scratch(spec)
        try:
            if os.geteuid() == 0:
                for name in ("inputs", "outputs"):
                    hand_over(folder / name, JobUser(NOBODY_ID, NOBODY_ID))
            else:
                for root, dirs, _ in os.walk(folder):
                    for name in dirs:
                        os.chmod(os.path.join(root, name), 0o777 if root == str(folder) else 0o755)
        except OSError as exc:
            raise StartFailed(f"cannot give the job its staged data: {exc}") from None
        return folder

    def _poll_container(self, handle: DockerHandle) -> int | None:
        container = handle.container
        try:
            container.reload()
        except Exception as exc:  # any engine error means the container is lost to us
            handle.failed = f"lost the container: {exc}"
            return ENGINE_FAILED
        if container.status in ENDED:
            if handle.output is not None:
                # The follower ends with the container; wait for its last lines so they are shipped.
                with suppress(Exception):
                    handle.output.result(timeout=LOG_DRAIN_S)
            return int(container.attrs["State"]["ExitCode"])
        if handle.kill_deadline is not None and self._clock() >= handle.kill_deadline:
            self._signal(handle, "SIGKILL")
        return None

    def port_address(self, handle: Handle, port: int) -> tuple[str, int]:
        """The container's address on its network (its own, or the egress bridge, whose
        containers cannot reach each other)."""
        assert isinstance(handle, DockerHandle)
        network = network_mode(handle.spec, self.cfg)
        try:
            handle.container.reload()
            address = handle.container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        except Exception as exc:  # noqa: BLE001 - gone, or not on the network
            raise StartFailed(f"the job's container has no address: {type(exc).__name__}") from None
        if not address:
            raise StartFailed("the job's container has no address")
        return (address, port)

    def _launch(self, handle: DockerHandle) -> None:
        assert handle.kwargs is not None
        try:
            if handle.kwargs["network_mode"] == job_network(handle.spec.allocation_id):
                self._job_network(handle.kwargs["network_mode"], handle.spec.allocation_id)
            self._guard_egress(handle.kwargs["network_mode"])
            handle.container = self.client.containers.create(**_sdk_kwargs(handle.kwargs))
            handle.container.start()
        except Exception as exc:  # the SDK raises several unrelated types
            self._remove(handle)
            # For the agent's log: the engine's answer may quote the settings.
            raise StartFailed(redact(f"{type(exc).__name__}: {exc}", handle.secrets)) from None
        handle.output = follow(handle.container, handle.log_path)

    def _job_network(self, name: str, allocation_id: str) -> None:
        """The job's own network, and the rules that keep the host's services off it."""
        self.job_networks.ensure()
        if not [network for network in self.client.networks.list(names=[name]) if network.name == name]:
            self.client.networks.create(**job_network_options(name, allocation_id))

    def _guard_egress(self, network: str) -> None:
        """Checked before every job that may reach the network: an engine restart or an owner's
        firewall script may have removed the rules since the last one."""
        if network == "none" or network.startswith(JOB_NETWORK_PREFIX):
            return
        if self.egress is None:
            raise EgressUnavailable("this unit guards no egress network")
        _egress_network(self.client, network)
        self.egress.ensure()

    def _signal(self, handle: DockerHandle, signal: str) -> None:
        with suppress(Exception):  # it may have exited meanwhile; the next poll says so
            handle.container.kill(signal=signal)

    def _remove_image(self, image: str) -> None:
        with suppress(Exception):  # in use by another container, or gone: nothing to free
            self.client.images.remove(image=image)
        self.pulled.forget(image)

    def _remove(self, handle: DockerHandle) -> None:
        """Remove the container on every path, a failed create or start included (found by name),
        and under a sandbox any of its processes the sandbox runtime left on the host."""
        container = handle.container
        if container is None:
            with suppress(Exception):  # never created
                container = self.client.containers.get(container_name(handle.spec.allocation_id))
        if container is not None:
            with suppress(Exception):  # already gone
                container.remove(force=True)
            if sandboxed(handle.spec, self.cfg):
                reap(container.id)
        if handle.spec.ports and not handle.spec.network_egress:
            with suppress(Exception):  # never made, or gone
                self.client.networks.get(job_network(handle.spec.allocation_id)).remove()


def _sdk_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    from docker.types import DeviceRequest

    requests: list[GpuRequest] = kwargs["device_requests"]
    # The engine's JSON wants lists where the pure spec keeps hashable tuples.
    devices = [
        DeviceRequest(driver=r.driver, device_ids=list(r.device_ids), capabilities=[list(c) for c in r.capabilities])
        for r in requests
    ]
    return {**kwargs, "device_requests": devices}


def _repo_digests(image: Any, ref: imageref.ImageRef) -> list[str]:
    """The image's digests in the repository `ref` names, from its RepoDigests (`name@sha256:…`)."""
    digests = []
    for entry in image.attrs.get("RepoDigests") or []:
        try:
            named = imageref.parse(entry)
        except imageref.BadReference:
            continue
        if named.digest and (named.host, named.port, named.path) == (ref.host, ref.port, ref.path):
            digests.append(named.digest)
    return digests


def _size(image: Any) -> int:
    """The image's unpacked size in bytes, as the engine reports it."""
    return int(image.attrs.get("Size") or 0)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _epoch(timestamp: str) -> float | None:
    # The engine writes nanoseconds (2024-05-01T10:00:00.123456789Z); Python parses microseconds.
    try:
        head, _, fraction = timestamp.rstrip("Z").partition(".")
        moment = datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}+00:00").timestamp()
    except ValueError:
        return None
    return moment if moment > 0 else None  # "0001-01-01T00:00:00Z": never
