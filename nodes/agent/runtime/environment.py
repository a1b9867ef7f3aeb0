"""What a job's environment holds besides the runtime's own variables: the renter's variables and
the values of the job's secrets; and the credential for its image's registry, which the job never
sees.

Secret values come from the server just before the job starts and live in memory only: the agent
never writes them to a file or to its log, and masks them in the job's log before it is shipped
(`logship.py`). The registry's password is kept and masked the same way.
"""

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nodes.agent import protocol
from nodes.agent.runtime import JobSpec

VARIABLE_NAME = re.compile(protocol.JOB_ENV_NAME)
# Shorter values are left alone when masking: "abc" or "1" would hit ordinary text everywhere.
MIN_MASK_BYTES = 4
NO_SECRETS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class RegistryCredential:
    """What the engine pulls a private image with, for that pull only: the password is not shown."""

    username: str
    password: str = field(repr=False)

    def auth_config(self) -> dict[str, str]:
        """As the Docker SDK's `images.pull` takes it: sent as the request's X-Registry-Auth."""
        return {"username": self.username, "password": self.password}


class Secrets(Mapping[str, str]):
    """The values of a job's secrets by name, and its registry credential if it names one. Neither
    repr nor str shows a value, so that no log line or exception message that mentions them can."""

    def __init__(self, values: Mapping[str, str] = NO_SECRETS, registry: RegistryCredential | None = None) -> None:
        self._values = dict(values)
        self.registry = registry

    def __getitem__(self, name: str) -> str:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Secrets({sorted(self._values)})"


def job_variables(spec: JobSpec, secrets: Mapping[str, str], own: Collection[str]) -> dict[str, str]:
    """The job's variables, then its secrets, less those named in `own` (what the runtime sets
    itself) and those the protocol reserves: the server refuses them, but the runtime's own must
    win whatever a server sends."""
    wanted = {**spec.env, **{name: secrets[name] for name in spec.secrets if name in secrets}}
    return {name: value for name, value in wanted.items() if name not in own and not protocol.job_env_reserved(name)}


def masks(secrets: Mapping[str, str]) -> list[bytes]:
    """The secret values to mask, the registry's password included, as UTF-8, longest first; none
    under MIN_MASK_BYTES."""
    values = {value.encode() for value in secrets.values()}
    if isinstance(secrets, Secrets) and secrets.registry is not None:
        values.add(secrets.registry.password.encode())
    return sorted((value for value in values if len(value) >= MIN_MASK_BYTES), key=len, reverse=True)


def redact(text: str, secrets: Mapping[str, str]) -> str:
    """`text` with every secret value masked: for messages that quote what a job was given."""
    for value in masks(secrets):
        text = text.replace(value.decode(), "***")
    return text
