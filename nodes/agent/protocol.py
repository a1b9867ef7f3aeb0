"""The agent protocol: the names and shapes the node agent and the server agree on.

Pure Python, imported by both sides (the agent installs without Django), so a value is written
once: the agent's client builds its URLs from the paths here, the server's URLs and model choices
are built from the values here, and tests/nodes/test_protocol.py checks both.
"""

from typing import NotRequired, TypedDict

# The API: every path is relative to API_PREFIX.
API_PREFIX = "/api/agent/v1"
ENROL = "enrol"
HEARTBEAT = "heartbeat"
NEXT_ASSIGNMENT = "assignments/next"
ALLOCATION_ACTIONS = ("start", "usage", "logs", "finish", "secrets", "staging")

# A job's environment variables (its own and its secrets'): the names a job may set. The agent
# sets the reserved ones itself (the devices, the job's ids, its home), and they always win.
JOB_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
JOB_ENV_RESERVED = frozenset({"HOME", "CUDA_VISIBLE_DEVICES"})
JOB_ENV_RESERVED_PREFIXES = ("SHEDSHARE_", "NVIDIA_")


def job_env_reserved(name: str) -> bool:
    return name.upper() in JOB_ENV_RESERVED or name.upper().startswith(JOB_ENV_RESERVED_PREFIXES)


# The agent's stream: one WebSocket per unit (``ws(s)://<server>`` + API_PREFIX + "/" + STREAM),
# opened with the same ``Authorization: Bearer <node credential>`` header as every HTTP call.
# Frames are JSON text. Over it:
#
# - the agent makes the calls it would make over HTTP, except enrol and the assignment poll:
#   ``{"id": 7, "method": "POST", "path": "heartbeat", "body": {...}}`` (path relative to
#   API_PREFIX: HEARTBEAT or an allocation_path); the server answers each, in any order, with
#   ``{"re": 7, "status": 200, "body": {...}}`` — status and body exactly what the HTTP call would
#   have answered (a problem+json object for an error), plus ``"retry_after": seconds`` where
#   HTTP would have sent a Retry-After header;
# - the server pushes, the moment they commit, ``{"push": "assignment", "body": Assignment}``
#   (handed over exactly as a pulled one: the agent starts it or reports why not) and
#   ``{"push": "state", "body": HeartbeatReply}`` (cancels, preemptions, policy, status: acted on
#   as the answer to a heartbeat). The first frame of a connection is ``{"push": "hello", "body":
#   StreamHello}``.
#
# The agent falls back to HTTP (heartbeats and the long poll, same semantics) while it cannot
# hold the stream, and tries the stream again after STREAM_RETRY_S.
STREAM = "stream"
STREAM_RETRY_S = 60.0  # the agent's next try at the stream after it fell back to HTTP (jittered)
# The agent pings this often (and gives up on a stream whose pong is this late): its heartbeats
# prove the stream while they are answered; the ping finds a connection that died silently (a NAT
# that forgot it) between them. The server sends no pings of its own.
STREAM_PING_S = 60.0
STREAM_CALLS = (HEARTBEAT, *(f"allocations/{{id}}/{action}" for action in ALLOCATION_ACTIONS))


class StreamClose:
    """Close codes the server uses, and what the agent does about them."""

    UNAUTHORISED = 4401  # the credential is not valid: no stream; HTTP shows the agent why
    REPLACED = 4409  # a newer connection of the same unit took over: do not fight it
    SILENT = 4408  # no heartbeat for too long: the agent reconnects and beats
    TOO_BIG = 1009  # a frame over STREAM_MAX_FRAME bytes
    GOING_AWAY = 1001  # the server is shutting down: reconnect (to another server) soon, jittered
    SERVICE_RESTART = 1012  # the same, as uvicorn says it
    TRY_LATER = 1013  # the server cannot serve the stream now: fall back to HTTP, retry later


STREAM_MAX_FRAME = 2**20 + 2**16  # a frame: a full log chunk and its envelope


def allocation_path(allocation_id: str, action: str) -> str:
    """The path of one call about one allocation, e.g. ``allocations/<id>/finish``.

    The id is inserted as it is; a caller that takes it from the network quotes it first."""
    if action not in ALLOCATION_ACTIONS:
        raise ValueError(f"unknown allocation action {action!r}")
    return f"allocations/{allocation_id}/{action}"


class Isolation:
    """What a job is promised about its neighbours."""

    SHARED = "shared"  # time-sliced GPU, no memory isolation
    MIG = "mig"  # a hardware partition of a GPU
    GPU = "gpu"  # whole exclusive GPUs
    NODE = "node"  # the whole unit


ISOLATION_LEVELS = (Isolation.SHARED, Isolation.MIG, Isolation.GPU, Isolation.NODE)  # weakest to strongest


def isolation_rank(level: str) -> int:
    """The level's place in ISOLATION_LEVELS: a higher rank promises more."""
    return ISOLATION_LEVELS.index(level)


class SliceKind:
    """What one leased device is: also how an owner slices a unit's GPUs."""

    WHOLE = "whole"
    MIG = "mig"
    SHARED = "shared"


SLICE_KINDS = (SliceKind.WHOLE, SliceKind.MIG, SliceKind.SHARED)

# What a job is for, as the renter declares it; owners choose which classes they accept.
WORKLOAD_CLASSES = ("training", "fine_tuning", "inference", "batch", "interactive", "service")
SERVICE = "service"  # long-running, reached through its declared ports; billed per second as any job

# A job's ports (``"ports": [{"port": 8000, "protocol": "http"}]``): what it listens on inside its
# container. The agent reaches them over the job's private network and nothing else on the host
# can; renters reach them through the marketplace's relay over the agent's stream (below).
PORT_PROTOCOLS = ("http", "tcp")
MAX_JOB_PORTS = 8


class Relay:
    """Relay channels over the agent's stream: one TCP connection to a port of a running job.

    Control frames are JSON text, ``{"relay": <kind>, "channel": n, ...}``:

    - OPEN (server to agent): ``"allocation_id"``, ``"port"``; the agent connects to the job's
      port and answers OPENED, or REFUSED with a ``"detail"`` (not its job, not a declared port,
      nothing listening);
    - EOF (either way): the sender sends no more bytes (a half close, as TCP's);
    - CLOSE (either way): the channel is over, ``"detail"`` may say why;
    - CREDIT (either way): the receiver has taken ``"bytes"`` more bytes off the channel.

    Bytes are binary frames: the channel number as 4 bytes big-endian, then 1 to CHUNK bytes.
    Each frame counts its bytes plus FRAME_COST against a window of WINDOW a channel may have
    unacknowledged by CREDIT (which gives back the same count), so a slow reader holds the
    writer back instead of filling either side's memory, with tiny frames as with large; more,
    or a larger frame, is a protocol error and ends the channel. Channel numbers are the
    server's, unique per stream."""

    OPEN = "open"
    OPENED = "opened"
    REFUSED = "refused"
    EOF = "eof"
    CLOSE = "close"
    CREDIT = "credit"
    WINDOW = 4 * 2**20
    CHUNK = 256 * 2**10
    HEADER = 4
    FRAME_COST = 512  # what a frame costs a receiver beyond its bytes (its queue entry, its object)
    OPEN_TIMEOUT_S = 10.0  # the agent's connect to the job's port


class Finish:
    """Finish reasons the agent reports besides the refusals."""

    EXITED = "exited"  # the job ended on its own; the exit code says how
    TIMEOUT = "timeout"  # it ran past max_duration_s
    CANCELLED = "cancelled"  # the server listed it in a heartbeat's `cancel`
    PREEMPTED = "preempted"  # the server listed it in a heartbeat's `preempt`
    START_FAILED = "start_failed"  # the runtime could not start it, or the server would not let it
    # The server could not be reached to confirm the start for start_give_up_s (an outage): the
    # job never ran, which is neither its fault nor its failure.
    START_UNCONFIRMED = "start_unconfirmed"
    DRAINED = "drained"  # the agent was stopped with drain="stop" while it ran
    AGENT_STOPPED = "agent_stopped"  # the agent was stopped by force while it ran
    # The server would not give the job's secrets (not a refusal, which would queue the job again
    # for other units to be refused as well: the job fails, and says why).
    SECRETS_UNAVAILABLE = "secrets_unavailable"
    # The job's data could not be staged (its staging report says why): before the start, so the
    # job never ran; or after it exited, so its outputs are not all where it asked (failed, however
    # it exited: a partial upload is never presented as complete).
    STAGE_IN_FAILED = "stage_in_failed"
    STAGE_OUT_FAILED = "stage_out_failed"


class Staging:
    """The job's data, moved by the agent and never by the job (``allocations/{id}/staging``):
    inputs fetched into ``<scratch>/inputs/<path>`` before the start, outputs uploaded from
    ``<scratch>/outputs/<path>`` after the exit. Why a staging failed:"""

    MISSING = "missing"  # the object or URL answered 404 (an output path the job did not write)
    CHECKSUM = "checksum"  # its SHA-256 is not the declared one
    SIZE = "size"  # its size is not the declared one
    SCRATCH_FULL = "scratch_full"  # more than the unit's scratch space
    EXPIRED = "expired"  # the storage refused the (presigned) URL: 401 or 403
    UNREACHABLE = "unreachable"  # no answer, a network error, a 5xx, or a redirect elsewhere
    REFUSED = "refused"  # the endpoint is a private or local address on the shed's network
    BAD_PATH = "bad_path"  # an output path that escapes outputs/ or is not a regular file
    REASONS = (MISSING, CHECKSUM, SIZE, SCRATCH_FULL, EXPIRED, UNREACHABLE, REFUSED, BAD_PATH)


class RunsIn:
    """What the agent started a job in, as it confirms the start (``allocations/{id}/start``): the
    residency record states it rather than what the job asked for."""

    CONTAINER = "container"  # a container of the unit's engine, on its default runtime (runc)
    SANDBOX = "sandbox"  # a container under the engine's sandbox runtime (gVisor's runsc)
    PROCESS = "process"  # a plain process on the host: the development runtime, which isolates nothing
    ALL = (CONTAINER, SANDBOX, PROCESS)


REFUSED = "refused:"  # the prefix of the finish reason of an agent that would not run what it was sent


class Refused:
    """Why an agent would not run an assignment: finish reasons starting with REFUSED."""

    RESIDENCY = "refused:residency"  # the unit is not in one of the job's countries
    ISOLATION = "refused:isolation"  # the owner or the hardware does not offer the job's level
    SANDBOX = "refused:sandbox"  # no sandbox runtime configured
    EGRESS = "refused:egress"  # no egress network configured
    DEVICES = "refused:devices"  # the devices sent are not free here
    # The job's image names a registry the owner's policy does not allow (not on the unit's list,
    # or on a loopback, private or local address). The job's own doing, not the unit's.
    REGISTRY = "refused:registry"
    # A backyard limit (quiet hours, temperature, power budget) came into force after the
    # placement. Unlike the other refusals it is transient, so the unit stays a candidate.
    LIMITS = "refused:limits"


REFUSED_FOR_LIMITS = Refused.LIMITS


class MigReport(TypedDict):
    uuid: str
    profile: str  # e.g. "1g.10gb"
    memory_mb: int


class GpuReport(TypedDict):
    """One GPU in a heartbeat's inventory."""

    index: int
    uuid: str
    model: str
    vram_mb: int
    driver_version: NotRequired[str]
    cuda_version: NotRequired[str]
    mig_mode: NotRequired[bool]
    healthy: NotRequired[bool]
    temperature_c: NotRequired[int | None]
    power_w: NotRequired[float | None]
    mig_instances: NotRequired[list[MigReport]]


class LimitName:
    """The backyard limits an agent reports as in force (``backyard.Backyard.evaluate``)."""

    THERMAL = "thermal"
    QUIET_HOURS = "quiet_hours"
    POWER_BUDGET = "power_budget"


LIMIT_NAME_PATTERN = r"^[a-z][a-z_]{0,31}$"  # a newer agent may name a limit this server does not know


class LimitsReport(TypedDict):
    """A heartbeat's ``limits``: which backyard limits are in force and what they leave offered.
    Empty (``{}``) until the agent has evaluated them."""

    in_force: NotRequired[list[str]]  # LimitName values
    advertised_gpus: NotRequired[int]  # GPUs offered for new work now
    gpus: NotRequired[int]  # GPUs the unit has


class Heartbeat(TypedDict):
    """POST HEARTBEAT: what the agent has and runs."""

    gpus: list[GpuReport]
    running: list[str]  # allocation ids the agent runs now
    agent_version: str
    advertise: NotRequired[list[str] | None]  # GPU uuids taking new work; None: every healthy GPU
    limits: NotRequired[LimitsReport | None]  # backyard limits in force
    # The ISO 3166-1 country the owner configured the agent for; None or absent: none. The server
    # gives a unit whose agent disagrees with its declared country no residency-restricted job.
    country: NotRequired[str | None]


class QuietHours(TypedDict):
    start: str  # "HH:MM", local time
    end: str
    time_zone: str
    max_gpus: int
    power_cap_w: int | None


class Policy(TypedDict):
    """The owner's settings the agent enforces locally."""

    slicing: str  # one of SLICE_KINDS
    shared_fraction: int
    isolation_levels: list[str]
    quiet_hours: QuietHours | None
    power_budget_w: int | None
    thermal_stop_c: int
    thermal_resume_c: int


class HeartbeatReply(TypedDict):
    """The answer to a heartbeat: everything the agent must hear."""

    status: str  # the unit's status on the server
    heartbeat_interval_s: int
    cancel: list[str]  # allocation ids to stop, reported as Finish.CANCELLED
    preempt: list[str]  # allocation ids to SIGTERM, then kill after the grace; Finish.PREEMPTED
    policy: Policy


class StreamHello(TypedDict):
    """The first frame of a stream connection."""

    connection: str  # this connection's id, as the server logs it
    heartbeat_interval_s: int  # until an answer says otherwise


class UsageSample(TypedDict):
    """One sample in POST allocations/<id>/usage {"samples": [...]}; seq makes a resend harmless."""

    seq: int  # 1, 2, … per allocation
    gpu_ms: int  # GPU milliseconds since the previous sample, summed over the allocation's GPUs
    recorded_at: str  # ISO 8601 with a time zone
