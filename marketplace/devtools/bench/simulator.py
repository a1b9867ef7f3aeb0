"""The trace-replay simulator behind ``bench replay-openb``: a cluster of nodes fed a trace's
tasks under a packing policy, and the paper's two baselines (best-fit, first-fit).

Development only; production placement uses the FGD policy of ``marketplace.jobs.packing``."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from marketplace.jobs.packing import (
    _MISSING,
    MILLI,
    Choice,
    Policy,
    State,
    Task,
    fits,
    gpu_fits,
    gpu_options,
    leftover,
)


@dataclass
class Node:
    name: str
    cpu_milli: int
    memory_mib: int
    num_gpus: int
    model: str = ""
    cpu_left: int = field(init=False)
    mem_left: int = field(init=False)
    gpus: list[int] = field(init=False)  # free milli per GPU

    def __post_init__(self) -> None:
        self.cpu_left, self.mem_left = self.cpu_milli, self.memory_mib
        self.gpus = [MILLI] * self.num_gpus

    def state(self) -> State:
        return (self.cpu_left, self.mem_left, tuple(sorted(self.gpus)))


@dataclass(frozen=True)
class Placement:
    node: int  # index into Cluster.nodes
    gpus: tuple[int, ...]  # GPU indices used on that node


def make_best_fit(max_cpu: int, max_gpu: int) -> Policy:
    """Best-fit: minimise 0.5*cpu_left/max_cpu + 0.5*gpu_left/max_gpu after placement; tightest GPU inside."""

    def cost(state: State, task: Task) -> Choice | None:
        if not fits(state, task):
            return None
        return (leftover(state, task, max_cpu, max_gpu), gpu_options(state, task)[0])

    return cost


def first_fit(state: State, task: Task) -> Choice | None:
    """The naive baseline: the first node in list order that fits, its first GPU (by device index) with room.

    As a policy every feasible state costs the same; ``Cluster.place`` recognises it and walks the nodes in
    order instead of scoring groups, because grouping identical states forgets which node comes first.
    """
    if not fits(state, task):
        return None
    return (0.0, gpu_options(state, task)[0])


class Cluster:
    """Nodes grouped by identical state, so a policy scores each distinct state once per task shape.

    Equal costs go to the node that comes first in list order, as the paper's simulator does (it takes the
    lexicographically smallest node name, names carrying a seeded random prefix). Always preferring the same
    nodes packs work together and keeps whole nodes free for gang tasks; with ``random_ties`` they are spread
    uniformly at random instead, as a stock Kubernetes scheduler would.
    """

    def __init__(self, nodes: list[Node], random_ties: bool = False) -> None:
        self.nodes = nodes
        self.random_ties = random_ties
        self.groups: dict[State, list[int]] = {}  # members kept in ascending index order
        for i, node in enumerate(nodes):
            self.groups.setdefault(node.state(), []).append(i)
        self.capacity = sum(n.num_gpus for n in nodes) * MILLI
        self.allocated = 0
        self._cache: dict[tuple[int, tuple], dict[State, Choice | None]] = {}

    def allocation_ratio(self) -> float:
        """Allocated GPU milli / total GPU milli."""
        return self.allocated / self.capacity if self.capacity else 0.0

    def best(self, task: Task, policy: Policy, rng: random.Random) -> tuple[int, int] | None:
        """(node index, chosen GPU free value) of the lowest-cost node; ties as the class docstring says."""
        best_cost, tied = float("inf"), []
        cache = self._cache.setdefault((id(policy), task.shape), {})
        for state, members in self.groups.items():
            result = cache.get(state, _MISSING)
            if result is _MISSING:
                result = cache[state] = policy(state, task)
            if result is None or result[0] > best_cost + 1e-9:
                continue
            if result[0] < best_cost - 1e-9:
                best_cost, tied = result[0], []
            tied.append((members, result[1]))
        if not tied:
            return None
        if self.random_ties:
            members, choice = tied[0] if len(tied) == 1 else _pick_group(tied, rng)
            return rng.choice(members), choice
        members, choice = min(tied, key=lambda group: group[0][0])
        return members[0], choice

    def place(self, task: Task, policy: Policy, rng: random.Random) -> Placement | None:
        """Place task at once (all or nothing) or return None; the caller counts it as failed.

        ``first_fit`` is not scored: it walks the nodes in list order (see ``first_fitting``).
        """
        found = self.first_fitting(task) if policy is first_fit else self.best(task, policy, rng)
        if found is None:
            return None
        index, gpu_free = found
        return self._commit(index, task, gpu_free)

    def first_fitting(self, task: Task) -> tuple[int, int] | None:
        """(node index, GPU free value) of the first node in list order that fits, and its first GPU with room."""
        for index, node in enumerate(self.nodes):
            if node.cpu_left < task.cpu_milli or node.mem_left < task.memory_mib:
                continue
            if not gpu_fits(node.gpus, task.num_gpu, task.gpu_milli):
                continue
            if not task.fractional:
                return index, -1
            return index, next(free for free in node.gpus if free >= task.gpu_milli)
        return None

    def _commit(self, index: int, task: Task, gpu_free: int) -> Placement:
        node = self.nodes[index]
        old = node.state()
        if task.fractional:
            used = (node.gpus.index(gpu_free),)
            node.gpus[used[0]] -= task.gpu_milli
        else:
            used = tuple(i for i, free in enumerate(node.gpus) if free == MILLI)[: task.num_gpu]
            for i in used:
                node.gpus[i] = 0
        node.cpu_left -= task.cpu_milli
        node.mem_left -= task.memory_mib
        self.allocated += task.gpu_demand
        self._regroup(index, old, node.state())
        return Placement(index, used)

    def _regroup(self, index: int, old: State, new: State) -> None:
        members = self.groups[old]
        members.remove(index)
        if not members:
            del self.groups[old]
        bisect.insort(self.groups.setdefault(new, []), index)


def _pick_group(tied: list[tuple[list[int], int]], rng: random.Random) -> tuple[list[int], int]:
    """Choose among tied groups in proportion to their size (uniform over the tied nodes)."""
    sizes = [len(members) for members, _ in tied]
    return rng.choices(tied, weights=sizes)[0]


@dataclass
class ReplayResult:
    ratio_at: dict[int, float]  # arrived-demand percent -> mean allocation ratio of arrivals rounding to it
    placed: int
    failed: int


def build_workload(tasks: list[Task], capacity: int, seed: int, until: float = 1.3) -> list[Task]:
    """The paper's arrivals: the trace shuffled, then tasks drawn with replacement until demand >= until×capacity."""
    rng = random.Random(seed)
    order = list(tasks)
    rng.shuffle(order)
    demand = sum(t.gpu_demand for t in order)
    while demand < until * capacity:
        extra = rng.choice(tasks)
        order.append(extra)
        demand += extra.gpu_demand
    return order


def replay(
    nodes: list[Node], arrivals: list[Task], policy: Policy, seed: int, stop_pct: int = 130, random_ties: bool = False
) -> ReplayResult:
    """Place arrivals one at a time; average the allocation ratio over arrivals in each rounded percent of demand."""
    cluster, rng = Cluster(nodes, random_ties=random_ties), random.Random(seed)
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    arrived, placed, failed = 0, 0, 0
    for task in arrivals:
        arrived += task.gpu_demand
        pct = round(100 * arrived / cluster.capacity)
        if pct > stop_pct:
            break
        if cluster.place(task, policy, rng) is None:
            failed += 1
        else:
            placed += 1
        sums[pct] = sums.get(pct, 0.0) + cluster.allocation_ratio()
        counts[pct] = counts.get(pct, 0) + 1
    return ReplayResult({p: sums[p] / counts[p] for p in sums}, placed, failed)
