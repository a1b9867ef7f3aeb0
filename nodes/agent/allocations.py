"""An assignment from the server, from acceptance to its final usage sample."""

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from nodes.agent.backoff import Backoff
from nodes.agent.gpus import Gpu
from nodes.agent.protocol import MAX_JOB_PORTS, Finish, Isolation, Refused, SliceKind
from nodes.agent.runtime import Handle, JobSpec
from nodes.agent.runtime.environment import NO_SECRETS, VARIABLE_NAME, Secrets

# One hour of wall time per sample: for 64 GPUs that is the most GPU time the server takes in one.
MAX_SAMPLE_WALL_MS = 3_600_000


class InvalidAssignment(Exception):
    """An assignment the agent will not run; `reason` is what the finish report says."""

    def __init__(self, message: str, allocation_id: str | None, reason: str = Finish.START_FAILED) -> None:
        super().__init__(message)
        self.allocation_id = allocation_id
        self.reason = reason


@dataclass
class Allocation:
    spec: JobSpec
    gpus: tuple[Gpu, ...]
    max_duration_s: float | None
    accepted_at: float
    handle: Handle | None = None
    started_at: float = 0.0
    last_sample_at: float = 0.0
    metered_ms: int = 0
    seq: int = 0
    stop_reason: str | None = None
    next_start_at: float = 0.0
    start_backoff: Backoff = field(default_factory=Backoff)
    sampled_at: str = ""  # wall-clock time (ISO 8601) of the last sample, or of the start
    log_offset: int = 0  # bytes of the job's log already queued for the server
    # The values of the job's secrets, in memory only: None until the server has given them.
    secrets: Secrets | None = None
    # The runtime's pull of the job's image, begun once the secrets are here; its result is the
    # image's digest, which the start names.
    pull: Future[str | None] | None = None
    # When the image was ready: the start's give-up time counts from then, a long pull being no outage.
    ready_at: float | None = None
    # The move of the job's data now under way (the inputs' fetch before the start, the outputs'
    # upload after the exit); its result is the phase's staging report.
    staging: Future[dict[str, Any]] | None = None
    staged_in: bool = False
    # How the job ended, kept while its outputs upload: the finish reports it afterwards.
    exit_code: int | None = None
    exit_reason: str = ""

    @property
    def id(self) -> str:
        return self.spec.allocation_id

    @property
    def given_secrets(self) -> Mapping[str, str]:
        """The secrets the server has given, none before. Not `secrets or …`: Secrets without a
        variable are empty, yet may hold the registry credential."""
        return NO_SECRETS if self.secrets is None else self.secrets

    @property
    def awaiting_secrets(self) -> bool:
        return (bool(self.spec.secrets) or self.spec.registry_auth) and self.secrets is None

    def mark_started(self, handle: Handle, now: float, wall: str = "") -> None:
        self.handle = handle
        self.started_at = self.last_sample_at = now
        self.sampled_at = wall

    def overdue(self, now: float) -> bool:
        return self.max_duration_s is not None and now - self.started_at >= self.max_duration_s

    def samples(self, now: float, recorded_at: str) -> list[dict[str, Any]]:
        """The next usage samples: GPU-milliseconds since the previous one, in one sample unless
        more than an hour is due (after a long absence of the agent).

        Measured from the start on every call, so rounding never accumulates across samples.
        """
        wall_ms = max(self.metered_ms, round((now - self.started_at) * 1000))
        samples = []
        while not samples or self.metered_ms < wall_ms:
            step = min(wall_ms - self.metered_ms, MAX_SAMPLE_WALL_MS)
            self.metered_ms += step
            self.seq += 1
            samples.append({"seq": self.seq, "gpu_ms": step * len(self.gpus), "recorded_at": recorded_at})
        self.last_sample_at, self.sampled_at = now, recorded_at
        return samples


@dataclass(frozen=True)
class Device:
    """One device of an assignment: what the job is given, on which GPU, held as which slot."""

    gpu: Gpu
    uuid: str
    slot: str


def held_slots(allocations: list[Allocation]) -> dict[str, set[str]]:
    """For each GPU uuid, the slots running jobs hold on it."""
    held: dict[str, set[str]] = {}
    for allocation in allocations:
        slots = allocation.spec.slots or tuple(gpu.uuid for gpu in allocation.gpus)
        for gpu, slot in zip(allocation.gpus, slots, strict=False):
            held.setdefault(gpu.uuid, set()).add(slot)
    return held


def _device(entry: dict[str, Any], inventory: dict[str, Gpu], held: dict[str, set[str]]) -> Device | None:
    """The device an assignment entry names, or None if this unit cannot give it now.

    A whole GPU needs the GPU to be idle; a MIG instance or a share needs the GPU not to be held
    whole, and that very instance or share to be free.
    """
    kind = str(entry.get("kind", SliceKind.WHOLE))
    uuid = str(entry["uuid"])
    gpu = inventory.get(str(entry.get("gpu_uuid", uuid)))
    if gpu is None:
        return None
    taken = held.get(gpu.uuid, set())
    if kind == SliceKind.WHOLE:
        return Device(gpu, gpu.uuid, gpu.uuid) if uuid == gpu.uuid and not taken else None
    if gpu.uuid in taken:
        return None
    if kind == SliceKind.MIG:
        known = {mig.uuid for mig in gpu.mig_instances}
        return Device(gpu, uuid, uuid) if uuid in known and uuid not in taken else None
    if kind == SliceKind.SHARED:
        slot = f"{gpu.uuid}#{int(entry.get('share', 0))}"
        return Device(gpu, gpu.uuid, slot) if uuid == gpu.uuid and slot not in taken else None
    return None


def parse_assignment(
    data: dict[str, Any], inventory: dict[str, Gpu], now: float, held: dict[str, set[str]] | None = None
) -> Allocation:
    """Build an Allocation, refusing devices this unit does not have or has not free."""
    allocation_id = data.get("allocation_id")
    held = held or {}
    try:
        job = data["job"]
        entries = list(data["gpus"])
        devices = [_device(entry, inventory, held) for entry in entries]
        spec = JobSpec(
            allocation_id=str(allocation_id),
            job_id=str(job["id"]),
            image=str(job.get("image", "")),
            command=tuple(_argv(job["command"])),
            gpu_uuids=tuple(d.uuid if d else str(e["uuid"]) for d, e in zip(devices, entries, strict=True)),
            slots=tuple(d.slot for d in devices if d),
            isolation=str(job.get("isolation", Isolation.GPU)),
            allowed_countries=_countries(job.get("allowed_countries") or []),
            network_egress=_flag(job, "network_egress"),
            sandboxed=_flag(job, "sandboxed"),
            interruptible=_flag(job, "interruptible"),
            env=_env(job.get("env") or {}),
            secrets=_names(job.get("secrets") or []),
            registry_auth=_flag(job, "registry_auth"),
            inputs=_data(job.get("inputs") or [], ("url", "path"), ("sha256", "size")),
            outputs=_data(job.get("outputs") or [], ("url", "path"), ()),
            ports=_ports(job.get("ports") or []),
        )
        max_duration = job.get("max_duration_s")
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidAssignment(f"malformed assignment: {exc!r}", allocation_id) from None
    if allocation_id is None:
        raise InvalidAssignment("assignment without allocation_id", None)
    gpus = [d.gpu.uuid for d in devices if d]
    if not devices or None in devices or len(set(spec.slots)) != len(spec.slots) or len(set(gpus)) != len(gpus):
        raise InvalidAssignment(f"devices not free here: {list(spec.gpu_uuids)}", spec.allocation_id, Refused.DEVICES)
    return Allocation(
        spec=spec,
        gpus=tuple(d.gpu for d in devices if d),
        max_duration_s=float(max_duration) if max_duration else None,
        accepted_at=now,
    )


def _ports(ports: Any) -> tuple[int, ...]:
    if not isinstance(ports, list) or len(ports) > MAX_JOB_PORTS:
        raise ValueError(f"ports must be a list of at most {MAX_JOB_PORTS}")
    numbers = tuple(entry.get("port") if isinstance(entry, dict) else None for entry in ports)
    if not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 65535 for n in numbers):
        raise ValueError("a port is a number from 1 to 65535")
    return numbers


def _argv(command: Any) -> list[str]:
    if not isinstance(command, list) or not all(isinstance(arg, str) for arg in command):
        raise ValueError("command must be a list of strings")
    return command


def _flag(job: dict[str, Any], key: str) -> bool:
    value = job.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def _env(env: Any) -> dict[str, str]:
    # The messages name no value: the renter may have put something private in one all the same.
    if not isinstance(env, dict) or not all(isinstance(value, str) and "\0" not in value for value in env.values()):
        raise ValueError("env must map variable names to text without NUL")
    _names(list(env))
    return dict(env)


def _names(names: Any) -> tuple[str, ...]:
    if not isinstance(names, list) or not all(isinstance(n, str) and VARIABLE_NAME.fullmatch(n) for n in names):
        raise ValueError(f"variable names must match {VARIABLE_NAME.pattern}")
    return tuple(names)


def _data(items: Any, required: tuple[str, ...], optional: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    """The job's inputs or outputs, as the staging needs them; the paths are checked again there."""
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError("inputs and outputs must be lists of objects")
    data = []
    for item in items:
        if not all(isinstance(item.get(key), str) for key in required):
            raise ValueError(f"each input and output needs {' and '.join(required)}")
        kept = {key: item[key] for key in (*required, "jurisdiction", *optional) if item.get(key) is not None}
        if not isinstance(kept.get("size", 0), int) or not isinstance(kept.get("sha256", ""), str):
            raise ValueError("an input's size is a number of bytes and its sha256 hex text")
        data.append(kept)
    return tuple(data)


def _countries(codes: Any) -> tuple[str, ...]:
    if not isinstance(codes, list) or not all(isinstance(code, str) for code in codes):
        raise ValueError("allowed_countries must be a list of country codes")
    return tuple(code.upper() for code in codes)
