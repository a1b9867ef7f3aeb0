"""Runtimes run one allocation's job; the loop talks to them only through `Runtime`.

`start` launches and returns a handle at once; `poll` never blocks; `kill` asks the job to stop
and the runtime escalates on later polls, so a slow job never stalls heartbeats; `cleanup`
removes whatever the job left behind once it has exited. A runtime that is also `Adoptable`
lets a restarted agent find its jobs again; one that is also `Pulling` runs jobs from images,
which it fetches before their start; one that is also `Scratch` gives the agent the folder where
it stages a job's data (`staging.py`).
"""

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from nodes.agent.protocol import Isolation

if TYPE_CHECKING:
    from nodes.agent.runtime.environment import RegistryCredential


class StartFailed(Exception):
    pass


class RuntimeUnavailable(Exception):
    """The configured runtime cannot run anything on this machine (no engine, no sandbox)."""


@dataclass(frozen=True)
class JobSpec:
    allocation_id: str
    job_id: str
    image: str
    command: tuple[str, ...]
    gpu_uuids: tuple[str, ...]  # whole GPUs (GPU-…) or MIG instances (MIG-…)
    isolation: str = Isolation.GPU
    allowed_countries: tuple[str, ...] = ()  # empty: anywhere
    network_egress: bool = False
    sandboxed: bool = False
    interruptible: bool = False  # placement may stop it for an on-demand job (a preemption)
    # What each device is held as: the GPU uuid (whole), the MIG uuid, or "<GPU uuid>#<share>".
    slots: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # the renter's variables
    secrets: tuple[str, ...] = ()  # the names of the job's secret variables; never their values
    registry_auth: bool = False  # the image is pulled with the renter's registry credential
    # The job's data, which the agent moves for it: {"url", "path", "jurisdiction"[, "sha256", "size"]}.
    inputs: tuple[Mapping[str, Any], ...] = ()
    outputs: tuple[Mapping[str, Any], ...] = ()
    ports: tuple[int, ...] = ()  # what it listens on, for the relay (protocol.Relay)


class Handle(Protocol):
    spec: JobSpec
    log_path: Path  # the job's output, which the agent ships to the server


class Runtime(Protocol):
    def runs_in(self, spec: JobSpec) -> str:
        """What the job runs in here: a `protocol.RunsIn` value."""

    def start(self, spec: JobSpec, secrets: Mapping[str, str] = ...) -> Handle:
        """Launch the job with `spec.env` and the values of `spec.secrets` in its environment."""

    def poll(self, handle: Handle) -> int | None:
        """Exit code once the job has exited (128 + N when killed by signal N), else None."""

    def kill(self, handle: Handle) -> None: ...

    def cleanup(self, handle: Handle) -> None: ...


@dataclass(frozen=True)
class Adopted:
    """A job found again after a restart; `exit_code` and `exited_at` (Unix time) are set when
    it ended while the agent was away; `started_at` (Unix time) where the runtime knows it."""

    handle: Handle
    exit_code: int | None = None
    exited_at: float | None = None
    started_at: float | None = None


@runtime_checkable
class Adoptable(Protocol):
    def describe(self, handle: Handle) -> dict[str, Any]:
        """What `adopt` needs to find the job again, as JSON-able data the agent keeps on disk."""

    def adopt(self, spec: JobSpec, saved: dict[str, Any]) -> Adopted | None:
        """The job `describe` saved, or None when it is gone without a trace (a reboot). `saved`
        is empty for a job the agent was starting when it stopped."""


@runtime_checkable
class Ports(Protocol):
    def port_address(self, handle: Handle, port: int) -> tuple[str, int]:
        """Where the agent connects to reach `port` of the running job: an address only the
        agent can reach (the job's private network). Raises StartFailed when there is none."""


@runtime_checkable
class Housekeeping(Protocol):
    def housekeep(self) -> None:
        """Called every tick; does what is due (pruning unused images) without blocking."""


@runtime_checkable
class Pulling(Protocol):
    def pull(self, spec: JobSpec, registry: "RegistryCredential | None" = None) -> Future[str | None]:
        """Bring the job's image here for its start, pulled with `registry` if given (for that
        pull only), without blocking. The future's result is the image's repo digest (sha256:…;
        None for an image without one); its exception StartFailed, in words the renter may read."""


@runtime_checkable
class Scratch(Protocol):
    """A folder on this machine with `inputs/` and `outputs/`, which the job sees in its scratch
    (its HOME) as they are: made before the start for the agent to fetch the job's inputs into,
    kept by `start`, read for the outputs' upload after the exit, then removed by `cleanup`."""

    def make_scratch(self, spec: JobSpec) -> Path:
        """Make the folder, new and empty but for `inputs/` and `outputs/`; where it is."""

    def scratch(self, spec: JobSpec) -> Path:
        """Where the folder is, for a job started (or adopted) with one."""

    def drop_scratch(self, spec: JobSpec) -> None:
        """Remove the folder of a job that never started."""
