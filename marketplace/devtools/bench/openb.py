"""Load the Alibaba openb GPU trace (nodes and pods CSVs) into ``packing`` objects."""

import csv
from pathlib import Path

from marketplace.devtools.bench import simulator
from marketplace.jobs import packing

NODE_FILE = "openb_node_list_gpu_node.csv"
POD_FILE = "openb_pod_list_default.csv"


class TraceError(ValueError):
    """The trace folder is missing a file or holds something this replay cannot model."""


def default_trace_dir() -> Path:
    """../shared/traces/alibaba-openb next to the repository root (the folder holding manage.py)."""
    repo = Path(__file__).resolve().parents[3]
    return (repo.parent / "shared" / "traces" / "alibaba-openb").resolve()


def check_trace_dir(trace_dir: Path) -> None:
    missing = [name for name in (NODE_FILE, POD_FILE) if not (trace_dir / name).exists()]
    if missing:
        raise TraceError(f"trace files not found in {trace_dir}: {', '.join(missing)}")


def load_nodes(trace_dir: Path) -> list[simulator.Node]:
    """Nodes in file order, which is the order first-fit walks them in."""
    with open(trace_dir / NODE_FILE, newline="") as fh:
        return [
            simulator.Node(r["sn"], int(r["cpu_milli"]), int(r["memory_mib"]), int(r["gpu"]), r["model"])
            for r in csv.DictReader(fh)
        ]


def load_tasks(trace_dir: Path) -> list[packing.Task]:
    with open(trace_dir / POD_FILE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if any(r.get("gpu_spec") for r in rows):
        raise TraceError("gpu_spec constraints are not supported by this replay")
    return [
        packing.Task(int(r["cpu_milli"]), int(r["memory_mib"]), int(r["num_gpu"]), int(r["gpu_milli"]), r["name"])
        for r in rows
    ]
