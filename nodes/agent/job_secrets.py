"""The values of a job's secrets, which the server gives only when asked, just before the start.

The assignment names the secrets, and says whether the job has a registry credential;
POST allocations/<id>/secrets answers their values ({"env": {...}, "registry": {"username": ...,
"password": ...}}). The agent keeps them in memory for as long as the allocation runs, for the
job's environment, its image's pull and to mask them in its log, and a restarted agent asks again
(`runtime/environment.py` says how they are kept out of files and logs).
"""

from typing import Any

from nodes.agent.allocations import InvalidAssignment
from nodes.agent.client import AgentClient, BadRequest, NotFound
from nodes.agent.protocol import Finish
from nodes.agent.runtime import JobSpec
from nodes.agent.runtime.environment import RegistryCredential, Secrets

UNAVAILABLE = Finish.SECRETS_UNAVAILABLE


def fetch(client: AgentClient, spec: JobSpec) -> Secrets:
    """The values of `spec.secrets`, and the registry credential when `spec.registry_auth`.

    Raises InvalidAssignment (reason UNAVAILABLE) when the server will not give them, Conflict
    when the allocation ended meanwhile, and a retryable AgentError while it cannot be reached.
    """
    try:
        answer = client.secrets(spec.allocation_id)
    except (NotFound, BadRequest) as exc:
        raise InvalidAssignment(f"the server gives no secrets: {exc}", spec.allocation_id, UNAVAILABLE) from None
    values = answer.get("env")
    if not isinstance(values, dict):
        values = {}
    # Named, never quoted: the message goes to the agent's log.
    missing = [name for name in spec.secrets if not isinstance(values.get(name), str) or "\0" in values[name]]
    if missing:
        raise InvalidAssignment(f"no usable value for secrets {missing}", spec.allocation_id, UNAVAILABLE)
    registry = _credential(answer.get("registry")) if spec.registry_auth else None
    if spec.registry_auth and registry is None:
        raise InvalidAssignment("no usable registry credential", spec.allocation_id, UNAVAILABLE)
    return Secrets({name: values[name] for name in spec.secrets}, registry)


def _credential(given: Any) -> RegistryCredential | None:
    if not isinstance(given, dict):
        return None
    username, password = given.get("username"), given.get("password")
    usable = all(isinstance(part, str) and part and "\0" not in part for part in (username, password))
    return RegistryCredential(username, password) if usable else None
