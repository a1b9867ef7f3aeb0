"""The owner's local isolation settings: where the unit is, what it may run and how tightly.

Read from the config file or SHEDSHARE_AGENT_<KEY> like every other key. The agent checks every
assignment against these itself, whatever the server says (see `refusal.py`), and the container
runtime builds its limits from them (see `runtime/spec.py`).
"""

import re
from dataclasses import dataclass, fields
from typing import Any

from nodes.agent.protocol import ISOLATION_LEVELS
from nodes.agent.runtime import job_user

LEVELS = ISOLATION_LEVELS  # weakest to strongest
RUNTIMES = ("process", "docker")
COUNTRY = re.compile(r"[A-Z]{2}")
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class IsolationConfig:
    country: str | None = None  # ISO 3166-1 alpha-2, as the owner declared it at enrolment
    runtime: str = "process"
    # The process runtime enforces nothing, so it takes work only when this says it is a dev box.
    allow_unisolated_dev_runtime: bool = False
    isolation_levels: tuple[str, ...] | None = None  # None: every level the hardware allows
    sandbox_runtime: str = ""  # an OCI runtime such as "runsc"; empty: no sandboxed jobs
    sandbox_all_jobs: bool = False  # the owner's rule: every job runs under sandbox_runtime
    # False: no job reaches the network. True: jobs that ask reach the internet through
    # egress_network, never the host, private ranges or link-local (see `egress.py`).
    allow_egress: bool = True
    egress_network: str = "shedshare-egress"
    scratch_mb: int = 4096
    tmp_mb: int = 256
    shm_mb: int = 1024
    memory_mb_per_gpu: int = 32768
    cpus_per_gpu: float = 4.0
    pids_limit: int = 4096
    # Who the process runtime runs jobs as when the agent is root: uid[:gid] or a user name.
    job_user: str = "65534:65534"


KEYS = tuple(f.name for f in fields(IsolationConfig))


def _country(value: Any) -> str | None:
    code = str(value).strip().upper()
    if code and not COUNTRY.fullmatch(code):
        raise ValueError(f"{value!r} is not an ISO 3166-1 alpha-2 code such as DE")
    return code or None


def _choice(options: tuple[str, ...]) -> Any:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return str(value)

    return parse


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in TRUE | FALSE:
        raise ValueError(f"{value!r} is not true or false")
    return text in TRUE


def _levels(value: Any) -> tuple[str, ...]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    unknown = [item for item in items if item not in LEVELS]
    if unknown:
        raise ValueError(f"unknown isolation levels {unknown}; known: {', '.join(LEVELS)}")
    return tuple(item for item in LEVELS if item in items)


def positive(kind: type) -> Any:
    """A parser of positive numbers of ``kind`` (NaN is not positive); the image policy's too."""

    def parse(value: Any) -> Any:
        number = kind(value)
        if not number > 0:
            raise ValueError(f"{value!r} must be positive")
        return number

    return parse


PARSERS = {
    "country": _country,
    "runtime": _choice(RUNTIMES),
    "allow_unisolated_dev_runtime": _flag,
    "isolation_levels": _levels,
    "sandbox_runtime": lambda value: str(value).strip(),
    "sandbox_all_jobs": _flag,
    "allow_egress": _flag,
    "egress_network": lambda value: str(value).strip(),
    "scratch_mb": positive(int),
    "tmp_mb": positive(int),
    "shm_mb": positive(int),
    "memory_mb_per_gpu": positive(int),
    "cpus_per_gpu": positive(float),
    "pids_limit": positive(int),
    "job_user": job_user.parse,
}
