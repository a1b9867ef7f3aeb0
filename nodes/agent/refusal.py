"""The agent's own check of an assignment against what its unit can honour.

The server should never send such an assignment, but a unit's promises (its location, its
isolation) are the owner's, so the agent checks them again before it starts anything. A refusal is
reported as a finish with a `refused:…` reason; the server then places the job elsewhere.
"""

from dataclasses import dataclass

from nodes.agent.allocations import Allocation, InvalidAssignment
from nodes.agent.gpus import Gpu
from nodes.agent.images import ImagePolicy, registry_problem
from nodes.agent.isolation import LEVELS, IsolationConfig
from nodes.agent.protocol import Isolation, Refused
from nodes.agent.runtime import JobSpec


@dataclass(frozen=True)
class LocalPolicy:
    """What this unit honours. The default honours nothing: an agent must be told what it offers."""

    country: str | None = None
    isolation_levels: frozenset[str] = frozenset()
    sandbox: bool = False
    egress: bool = False
    registries: ImagePolicy | None = None  # None: images are never pulled (the process runtime)


def policy_for(cfg: IsolationConfig, inventory: list[Gpu], image_policy: ImagePolicy | None = None) -> LocalPolicy:
    if cfg.runtime == "process":
        if not cfg.allow_unisolated_dev_runtime:
            return LocalPolicy(country=cfg.country)
        # A development box: nothing is enforced, so every promise is nominal.
        return LocalPolicy(country=cfg.country, isolation_levels=frozenset(LEVELS), sandbox=True, egress=True)
    levels = cfg.isolation_levels or _hardware_levels(inventory)
    return LocalPolicy(
        country=cfg.country,
        isolation_levels=frozenset(levels),
        sandbox=bool(cfg.sandbox_runtime),
        egress=cfg.allow_egress and bool(cfg.egress_network),
        registries=image_policy or ImagePolicy(),
    )


def refusal(spec: JobSpec, inventory: list[Gpu], policy: LocalPolicy) -> str | None:
    """Why this unit must not run the job (a finish reason), or None if it may."""
    if spec.allowed_countries and policy.country not in spec.allowed_countries:
        return Refused.RESIDENCY
    if spec.isolation not in policy.isolation_levels or not _devices_match(spec, inventory):
        return Refused.ISOLATION
    if spec.sandboxed and not policy.sandbox:
        return Refused.SANDBOX
    if spec.network_egress and not policy.egress:
        return Refused.EGRESS
    return None


def refuse_unfit(allocation: Allocation, inventory: list[Gpu], policy: LocalPolicy) -> None:
    """Raise InvalidAssignment with a `refused:…` reason if this unit must not run it."""
    spec = allocation.spec
    reason = refusal(spec, inventory, policy)
    if reason:
        here = policy.country or "no country configured"
        message = f"cannot honour isolation={spec.isolation} countries={list(spec.allowed_countries)} here ({here})"
        raise InvalidAssignment(message, spec.allocation_id, reason)
    # Last, as it may look the registry's name up: before anything is pulled from it.
    problem = registry_problem(spec.image, policy.registries) if policy.registries else None
    if problem:
        raise InvalidAssignment(f"image {spec.image!r} refused: {problem}", spec.allocation_id, Refused.REGISTRY)


def _hardware_levels(inventory: list[Gpu]) -> tuple[str, ...]:
    has_mig = any(gpu.mig_instances for gpu in inventory)
    return tuple(level for level in LEVELS if level != Isolation.MIG or has_mig)


def _devices_match(spec: JobSpec, inventory: list[Gpu]) -> bool:
    """A MIG instance is only a part of a GPU, so it satisfies `shared` and `mig` but never a job
    that paid for whole GPUs; a `node` job must hold every GPU of the unit."""
    partial = any(uuid.startswith("MIG-") for uuid in spec.gpu_uuids)
    if spec.isolation == Isolation.NODE:
        return not partial and set(spec.gpu_uuids) == {gpu.uuid for gpu in inventory}
    return not (spec.isolation == Isolation.GPU and partial)
