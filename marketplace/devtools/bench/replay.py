"""``bench replay-openb``: replay the Alibaba openb trace under the FGD paper's protocol.

The protocol (see ``shared/traces/alibaba-openb/README.md``): the 8,152 trace tasks in a seeded random order, then
tasks drawn with replacement until arrived GPU demand reaches the stop percent of capacity; each task is placed at
once or fails for good; the score is the allocation ratio averaged over the arrivals that round to each percent of
arrived demand. Every seed runs the production policy (``packing.make_fgd``, the one placement calls) beside a
naive first-fit and, unless switched off, the paper's best-fit, on identical arrivals.
"""

import argparse
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from marketplace.devtools.bench import openb, simulator
from marketplace.jobs import packing

HELP = "Replay the Alibaba openb trace (FGD paper protocol); print GPU allocation ratios as one JSON object."
FIRST_SEED = 42
PUBLISHED = {  # Weng et al., ATC'23, default openb trace, mean of seeds 42-51
    "fgd": {"at_100": 0.9523, "at_130": 0.9539},
    "best_fit": {"at_100": 0.9286, "at_130": 0.9308},
}


def default_workers() -> int:
    """One process per seed and policy, at most four: each replay is single-threaded pure Python."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=10, help="how many seeds, counting up from 42 (default 10)")
    parser.add_argument("--seed-list", default=None, help="explicit comma-separated seeds; overrides --seeds")
    parser.add_argument("--trace-dir", default=None, help="default: ../shared/traces/alibaba-openb")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes (default min(cpus, 4))")
    parser.add_argument("--until", type=int, default=100, help="stop at this percent of arrived demand (>= 100)")
    parser.add_argument(
        "--best-fit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also replay the paper's best-fit baseline (default on)",
    )


def seed_range(seeds: int, seed_list: str | None) -> list[int]:
    if seed_list:
        return [int(part) for part in seed_list.split(",") if part.strip()]
    return list(range(FIRST_SEED, FIRST_SEED + seeds))


def make_policy(name: str, nodes: list[simulator.Node], tasks: list[packing.Task]) -> packing.Policy:
    """The production FGD policy built from the trace's own task mix, or a baseline."""
    if name == "first_fit":
        return simulator.first_fit
    largest = {"max_cpu": max(n.cpu_milli for n in nodes), "max_gpu": max(n.num_gpus for n in nodes) * packing.MILLI}
    if name == "best_fit":
        return simulator.make_best_fit(**largest)
    return packing.make_fgd(packing.typical_task_types(tasks), **largest)


def node_order(nodes: list[simulator.Node], policy_name: str, seed: int) -> list[simulator.Node]:
    """The trace's node order for first-fit; a seeded shuffle of it for scored policies.

    Scored policies give ties to the node first in list order, and the paper's simulator ranks nodes by a seeded
    random permutation (a random prefix on each node name), so the replay does the same.
    """
    if policy_name == "first_fit":
        return nodes
    shuffled = list(nodes)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def replay_one(trace_dir: str, policy_name: str, seed: int, until: int) -> dict:
    """One (policy, seed) replay; module-level so a worker process can run it."""
    tasks = openb.load_tasks(Path(trace_dir))
    nodes = node_order(openb.load_nodes(Path(trace_dir)), policy_name, seed)
    capacity = sum(n.num_gpus for n in nodes) * packing.MILLI
    arrivals = simulator.build_workload(tasks, capacity, seed, until=until / 100)
    start = time.perf_counter()
    result = simulator.replay(nodes, arrivals, make_policy(policy_name, nodes, tasks), seed, stop_pct=until)
    return {
        "policy": policy_name,
        "seed": seed,
        "at_100": _round(result.ratio_at.get(100)),
        "at_130": _round(result.ratio_at.get(130)),
        "failed": result.failed,
        "seconds": round(time.perf_counter() - start, 1),
    }


def run(
    *, seeds: int, seed_list: str | None, trace_dir: str | None, workers: int, until: int, best_fit: bool, **_options
) -> dict:
    if until < 100:
        raise ValueError("--until must be at least 100: the headline figure is at 100% arrived demand")
    path = Path(trace_dir).expanduser().resolve() if trace_dir else openb.default_trace_dir()
    openb.check_trace_dir(path)
    chosen = seed_range(seeds, seed_list)
    policies = ["fgd", "first_fit"] + (["best_fit"] if best_fit else [])
    jobs = [(str(path), name, seed, until) for name in policies for seed in chosen]
    start = time.perf_counter()
    runs = _map(replay_one, jobs, workers)
    return summarise(runs, chosen, policies, until, time.perf_counter() - start)


def _map(fn, jobs: list[tuple], workers: int) -> list:
    """Run jobs in worker processes, or in this one when a single worker is asked for (tests, profiling)."""
    if workers <= 1:
        return [fn(*job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, *zip(*jobs, strict=True)))


def summarise(runs: list[dict], seeds: list[int], policies: list[str], until: int, seconds: float) -> dict:
    """Headline means plus one row per seed; key names say the policy and the percent of arrived demand."""
    by = {(r["policy"], r["seed"]): r for r in runs}
    out: dict = {"policy": "fgd", "gpu_alloc_ratio_at_100": _mean([by["fgd", s]["at_100"] for s in seeds])}
    for name in policies[1:]:
        out[f"{name}_alloc_ratio_at_100"] = _mean([by[name, s]["at_100"] for s in seeds])
    if until >= 130:
        for name in policies:
            out[_key(name, "alloc_ratio_at_130")] = _mean([by[name, s]["at_130"] for s in seeds])
    out["per_seed"] = [_seed_row(by, seed, policies, until) for seed in seeds]
    out.update(published=PUBLISHED, seeds=seeds, until_pct=until, seconds=round(seconds, 1))
    return out


def _seed_row(by: dict, seed: int, policies: list[str], until: int) -> dict:
    row: dict = {"seed": seed}
    for name in policies:
        run = by[name, seed]
        row[_key(name, "at_100")] = run["at_100"]
        if until >= 130:
            row[_key(name, "at_130")] = run["at_130"]
        row[_key(name, "failed")] = run["failed"]
    return row


def _key(policy: str, suffix: str) -> str:
    """The production policy's figures carry no prefix (``at_100``), baselines do (``first_fit_at_100``)."""
    if policy == "fgd":
        return "gpu_" + suffix if suffix.startswith("alloc") else suffix
    return f"{policy}_{suffix}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None
