"""Replay the Alibaba openb GPU trace under the FGD paper's protocol and print the GPU allocation ratio as JSON.

    python manage.py bench_packing [--policy fgd|fgd_exact|best_fit|all] [--seeds 42-51] [--trace-dir PATH]
"""

import csv
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from marketplace import packing

PUBLISHED = {"fgd": {"at_100": 0.9523, "at_130": 0.9539}, "best_fit": {"at_100": 0.9286, "at_130": 0.9308}}
PUBLISHED["fgd_exact"] = PUBLISHED["fgd"]  # FGD ranked by the exact fragmentation delta instead of the 0..100 score
POLICIES = ["best_fit", "fgd", "fgd_exact"]
NODE_FILE = "openb_node_list_gpu_node.csv"
POD_FILE = "openb_pod_list_default.csv"


def default_trace_dir() -> Path:
    """../shared/traces/alibaba-openb relative to the repository root (the directory holding manage.py)."""
    repo = Path(__file__).resolve().parents[3]
    return (repo.parent / "shared" / "traces" / "alibaba-openb").resolve()


def parse_seeds(text: str) -> list[int]:
    """'42-51' or '42,43,50' -> list of ints."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    return seeds


def load_nodes(trace_dir: Path) -> list[packing.Node]:
    with open(trace_dir / NODE_FILE, newline="") as fh:
        return [
            packing.Node(r["sn"], int(r["cpu_milli"]), int(r["memory_mib"]), int(r["gpu"]), r["model"])
            for r in csv.DictReader(fh)
        ]


def load_tasks(trace_dir: Path) -> list[packing.Task]:
    with open(trace_dir / POD_FILE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if any(r["gpu_spec"] for r in rows):
        raise CommandError("gpu_spec constraints are not supported by this replay")
    return [
        packing.Task(int(r["cpu_milli"]), int(r["memory_mib"]), int(r["num_gpu"]), int(r["gpu_milli"]), r["name"])
        for r in rows
    ]


def make_policy(name: str, nodes: list[packing.Node], tasks: list[packing.Task], threshold: float) -> packing.Policy:
    if name == "best_fit":
        return packing.make_best_fit(max(n.cpu_milli for n in nodes), max(n.num_gpus for n in nodes) * packing.MILLI)
    return packing.make_fgd(packing.typical_task_types(tasks, threshold), quantize=name == "fgd")


def run_one(trace_dir: str, policy_name: str, seed: int, threshold: float, stop_pct: int) -> dict:
    """One (policy, seed) replay; module-level so it can run in a worker process."""
    nodes, tasks = load_nodes(Path(trace_dir)), load_tasks(Path(trace_dir))
    policy = make_policy(policy_name, nodes, tasks, threshold)
    capacity = sum(n.num_gpus for n in nodes) * packing.MILLI
    arrivals = packing.build_workload(tasks, capacity, seed, until=stop_pct / 100)
    start = time.perf_counter()
    result = packing.replay(nodes, arrivals, policy, seed, stop_pct=stop_pct)
    return {
        "policy": policy_name,
        "seed": seed,
        "at_100": _round(result.ratio_at.get(100)),
        "at_130": _round(result.ratio_at.get(130)),
        "placed": result.placed,
        "failed": result.failed,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


class Command(BaseCommand):
    help = "Replay the Alibaba openb trace (FGD paper protocol) and print GPU allocation ratios as JSON."

    def add_arguments(self, parser):
        parser.add_argument("--policy", choices=[*POLICIES, "all"], default="all")
        parser.add_argument("--seeds", default="42-51", help="e.g. 42-51 or 42,43")
        parser.add_argument("--trace-dir", default=None, help="default: ../shared/traces/alibaba-openb from the repo")
        parser.add_argument("--until", type=int, default=130, help="stop at this percent of arrived demand")
        parser.add_argument("--typical-threshold", type=float, default=1.0, help="FGD: task share kept")
        parser.add_argument("--workers", type=int, default=2)

    def handle(self, *args, policy: str, seeds: str, trace_dir: str | None, until: int, typical_threshold: float,
               workers: int, **options):
        path = Path(trace_dir).expanduser().resolve() if trace_dir else default_trace_dir()
        if not (path / NODE_FILE).exists() or not (path / POD_FILE).exists():
            raise CommandError(f"trace files not found in {path}")
        policies = POLICIES if policy == "all" else [policy]
        jobs = [(str(path), p, s, typical_threshold, until) for p in policies for s in parse_seeds(seeds)]
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            runs = list(pool.map(run_one, *zip(*jobs, strict=True)))
        out: dict = {"trace_dir": str(path), "seeds": parse_seeds(seeds), "policies": {}}
        for name in policies:
            mine = [r for r in runs if r["policy"] == name]
            out["policies"][name] = {
                "gpu_alloc_ratio_at_100": _mean([r["at_100"] for r in mine]),
                "gpu_alloc_ratio_at_130": _mean([r["at_130"] for r in mine]),
                "per_seed": {r["seed"]: {k: r[k] for k in ("at_100", "at_130", "placed", "failed", "seconds")}
                             for r in mine},
                "published": PUBLISHED[name],
            }
        out["wall_seconds"] = round(time.perf_counter() - start, 1)
        self.stdout.write(json.dumps(out, indent=2))
