"""Unit tests for marketplace.jobs.packing on tiny synthetic clusters (no database, no trace replay)."""

import random

import pytest

from marketplace.devtools.bench import simulator
from marketplace.devtools.bench.simulator import Cluster, Node
from marketplace.jobs import packing
from marketplace.jobs.packing import Task, TaskType


def cluster(*gpu_counts: int) -> Cluster:
    return Cluster([Node(f"n{i}", 64000, 262144, g) for i, g in enumerate(gpu_counts)])


def cluster_of(*free_gpus: list[int]) -> Cluster:
    """A cluster whose nodes start with the given free milli per GPU (not all GPUs idle)."""
    nodes = [Node(f"n{i}", 64000, 262144, len(gpus)) for i, gpus in enumerate(free_gpus)]
    for node, gpus in zip(nodes, free_gpus, strict=True):
        node.gpus = list(gpus)
    return Cluster(nodes)


def frac(milli: int, cpu: int = 1000) -> Task:
    return Task(cpu, 1024, 1, milli)


def whole(k: int, cpu: int = 1000) -> Task:
    return Task(cpu, 1024, k, 1000)


BEST_FIT = simulator.make_best_fit(64000, 8000)


@pytest.mark.parametrize("policy", [BEST_FIT, packing.make_fgd([TaskType(1000, 1, 500, 1.0)])])
def test_fractional_tasks_share_a_gpu(policy):
    c = cluster(1)
    rng = random.Random(0)
    assert c.place(frac(500), policy, rng).gpus == (0,)
    assert c.place(frac(500), policy, rng).gpus == (0,)
    assert c.nodes[0].gpus == [0]
    assert c.place(frac(100), policy, rng) is None


def test_gang_task_needs_k_free_gpus_on_one_node():
    c = cluster(2, 2)  # 4 GPUs in total, but never 3 on one node
    rng = random.Random(0)
    assert c.place(whole(3), BEST_FIT, rng) is None
    placement = c.place(whole(2), BEST_FIT, rng)
    assert placement is not None and len(placement.gpus) == 2
    assert c.nodes[placement.node].gpus == [0, 0]


def test_partly_used_gpu_does_not_count_as_free_for_whole_gpu_tasks():
    c = cluster(2)
    rng = random.Random(0)
    c.place(frac(100), BEST_FIT, rng)
    assert c.place(whole(2), BEST_FIT, rng) is None
    assert c.place(whole(1), BEST_FIT, rng) is not None


def test_task_that_fits_nowhere_is_rejected_and_cluster_untouched():
    c = cluster(1)
    assert c.place(Task(128000, 0, 0, 0), BEST_FIT, random.Random(0)) is None  # too much CPU
    assert c.place(Task(1000, 10**9, 1, 100), BEST_FIT, random.Random(0)) is None  # too much memory
    assert c.nodes[0].gpus == [1000] and c.allocated == 0


def test_fragmentation_measure_matches_definition():
    # Node with GPUs free 300 and 1000; workload: half 500-milli fractions, half whole GPUs, CPU plentiful.
    types = [TaskType(1000, 1, 500, 0.5), TaskType(1000, 1, 1000, 0.5)]
    # For the 500 task the 300-milli GPU is a fragment; for the whole-GPU task too: 0.5*300 + 0.5*300.
    assert packing.node_fragmentation(64000, (300, 1000), types) == pytest.approx(300)
    # CPU short for every type: all 1300 idle milli are fragments.
    assert packing.node_fragmentation(0, (300, 1000), types) == pytest.approx(1300)
    # A task type needing no GPU sees all idle GPU as fragment.
    assert packing.task_fragmentation(64000, (300, 1000), TaskType(1000, 0, 0, 1.0)) == 1300


@pytest.mark.parametrize("quantize", [True, False])
def test_fgd_prefers_less_fragmenting_gpu_where_best_fit_differs(quantize):
    # One node, GPUs free 600 and 1000 (made by a prior 400 task). Workload: only 600-milli tasks.
    # A new 400 task: best-fit takes the tightest GPU (600 -> 200 left, now a fragment for 600 tasks);
    # FGD puts it on the full GPU (1000 -> 600), so both GPUs still fit a 600 task: zero fragmentation.
    fgd = packing.make_fgd([TaskType(1000, 1, 600, 1.0)], quantize=quantize)
    for policy, expected in ((BEST_FIT, [200, 1000]), (fgd, [600, 600])):
        c = cluster_of([600, 1000])
        c.place(frac(400), policy, random.Random(0))
        assert sorted(c.nodes[0].gpus) == expected


@pytest.mark.parametrize("quantize", [True, False])
def test_fgd_prefers_node_that_keeps_whole_gpus_for_gang_tasks(quantize):
    # Node 0 has a half-used GPU; node 1 is empty. Workload is mostly whole GPUs: a fraction should go to node 0.
    fgd = packing.make_fgd([TaskType(1000, 1, 500, 0.2), TaskType(1000, 2, 1000, 0.8)], quantize=quantize)
    c = cluster(2, 2)
    rng = random.Random(0)
    c.place(frac(500), fgd, rng)
    first = next(i for i, n in enumerate(c.nodes) if n.gpus != [1000, 1000])
    assert c.place(frac(500), fgd, rng).node == first
    assert c.nodes[1 - first].gpus == [1000, 1000]


def test_fgd_score_is_the_simulators_sigmoid_score():
    assert packing.fgd_score(0) == 50
    assert packing.fgd_score(-400) == 59  # fragmentation falls by 400 milli
    assert packing.fgd_score(1200) == 23
    assert packing.fgd_score(-20000) == 99 and packing.fgd_score(20000) == 0


def test_allocation_ratio():
    c = cluster(2, 2)
    rng = random.Random(0)
    c.place(whole(2), BEST_FIT, rng)
    c.place(frac(250), BEST_FIT, rng)
    assert c.allocated == 2250
    assert c.allocation_ratio() == pytest.approx(2250 / 4000)


def test_typical_task_types_weights_sum_to_one():
    tasks = [frac(500)] * 3 + [whole(2)]
    types = packing.typical_task_types(tasks)
    assert [(t.num_gpu, t.gpu_milli) for t in types] == [(1, 500), (2, 1000)]
    assert sum(t.weight for t in types) == pytest.approx(1.0)


def test_replay_averages_ratio_per_rounded_percent_of_arrived_demand():
    nodes = [Node("n0", 64000, 262144, 1)]
    arrivals = [frac(500), frac(500), frac(500)]  # arrived 50%, 100%, 150%
    result = simulator.replay(nodes, arrivals, BEST_FIT, seed=0, stop_pct=200)
    assert result.ratio_at == {50: 0.5, 100: 1.0, 150: 1.0}
    assert (result.placed, result.failed) == (2, 1)


def test_build_workload_reaches_demand_target():
    tasks = [frac(500), whole(1)]
    arrivals = simulator.build_workload(tasks, capacity=4000, seed=1, until=1.3)
    assert sum(t.gpu_demand for t in arrivals) >= 5200
    assert sorted(arrivals[:2], key=lambda t: t.num_gpu * t.gpu_milli) == tasks


def test_first_fit_takes_the_first_node_in_list_order_and_its_first_gpu_with_room():
    c = cluster_of([1000, 300], [1000] * 8, [1000] * 8)  # on node 0, GPU 1 is the tighter fit but GPU 0 comes first
    rng = random.Random(0)

    assert c.place(frac(200), simulator.first_fit, rng) == simulator.Placement(0, (0,))
    assert c.place(whole(4), simulator.first_fit, rng) == simulator.Placement(1, (0, 1, 2, 3))
    assert c.place(frac(900), simulator.first_fit, rng) == simulator.Placement(1, (4,))  # node 0 has 800 and 300 left
    assert [c.place(whole(1), simulator.first_fit, rng).node for _ in range(5)] == [1, 1, 1, 2, 2]


def test_first_fit_skips_nodes_short_of_cpu_or_memory_whatever_their_gpus():
    c = Cluster([Node("small", 2000, 262144, 8), Node("lowmem", 64000, 512, 8), Node("big", 64000, 262144, 8)])
    assert c.place(Task(4000, 1024, 1, 500), simulator.first_fit, random.Random(0)).node == 2
    assert c.place(Task(64001, 0, 0, 0), simulator.first_fit, random.Random(0)) is None


def test_first_fit_as_a_plain_policy_scores_every_feasible_state_alike():
    assert simulator.first_fit((64000, 1024, (300, 1000)), frac(200)) == (0.0, 300)
    assert simulator.first_fit((64000, 1024, (300, 1000)), whole(2)) is None


def test_equal_costs_go_to_the_node_first_in_list_order():
    # FGD sees no fragmentation either way, so b and c always tie; the small node cannot take the task at all.
    c = Cluster([Node("small", 2000, 262144, 8), Node("b", 64000, 262144, 8), Node("c", 64000, 262144, 8)])
    fgd = packing.make_fgd([TaskType(1000, 1, 1000, 1.0)])
    rng = random.Random(0)
    assert [c.place(whole(1, cpu=4000), fgd, rng).node for _ in range(3)] == [1, 1, 1]


def test_random_ties_spread_equal_costs_over_the_tied_nodes():
    c = Cluster([Node(f"n{i}", 64000, 262144, 8) for i in range(4)], random_ties=True)
    rng = random.Random(1)
    chosen = {c.best(whole(1), BEST_FIT, rng)[0] for _ in range(40)}
    assert chosen == {0, 1, 2, 3}


def test_fgd_gives_equal_scores_to_the_tighter_fit_before_list_order():
    # Whole-GPU workload: taking one idle GPU fragments nothing on either node, so both score alike.
    fgd = packing.make_fgd([TaskType(1000, 1, 1000, 1.0)])
    c = cluster_of([1000] * 8, [0] * 6 + [1000] * 2)
    assert c.place(whole(1), fgd, random.Random(0)).node == 1
