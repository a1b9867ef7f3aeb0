"""The values of a job's secrets, which the server gives only when asked, just before the start.

The assignment names the secrets; POST allocations/<id>/secrets answers their values. The agent
keeps them in memory for as long as the allocation runs, for the job's environment and to mask
them in its log, and a restarted agent asks again (`runtime/environment.py` says how they are kept
out of files and logs).
"""

from nodes.agent.allocations import InvalidAssignment
from nodes.agent.client import AgentClient, BadRequest, NotFound
from nodes.agent.protocol import Finish
from nodes.agent.runtime import JobSpec
from nodes.agent.runtime.environment import Secrets

UNAVAILABLE = Finish.SECRETS_UNAVAILABLE


def fetch(client: AgentClient, spec: JobSpec) -> Secrets:
    """The values of `spec.secrets`.

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
    return Secrets({name: values[name] for name in spec.secrets})
