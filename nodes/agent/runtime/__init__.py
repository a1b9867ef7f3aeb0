"""Runtimes run one allocation's job; the loop talks to them only through `Runtime`.

`start` launches and returns a handle at once; `poll` never blocks; `kill` asks the job to stop
and the runtime escalates on later polls, so a slow job never stalls heartbeats; `cleanup`
removes whatever the job left behind once it has exited.
"""

from dataclasses import dataclass
from typing import Protocol


class StartFailed(Exception):
    pass


@dataclass(frozen=True)
class JobSpec:
    allocation_id: str
    job_id: str
    image: str
    command: tuple[str, ...]
    gpu_uuids: tuple[str, ...]


class Handle(Protocol):
    spec: JobSpec


class Runtime(Protocol):
    def start(self, spec: JobSpec) -> Handle: ...

    def poll(self, handle: Handle) -> int | None:
        """Exit code once the job has exited (128 + N when killed by signal N), else None."""

    def kill(self, handle: Handle) -> None: ...

    def cleanup(self, handle: Handle) -> None: ...
