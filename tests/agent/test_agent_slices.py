"""The agent runs what the owner's slicing policy sells: whole GPUs, MIG instances and shares."""

import pytest

from nodes.agent import gpus
from nodes.agent.allocations import InvalidAssignment, held_slots, parse_assignment
from tests.agent.fakes import UNIT_ID

SHED = gpus.simulate("2xH100-80GB:mig=3g.40gb+3g.40gb", UNIT_ID)
INVENTORY = {gpu.uuid: gpu for gpu in SHED}
FIRST, SECOND = SHED
MIG_A, MIG_B = (mig.uuid for mig in FIRST.mig_instances)


def assignment(allocation_id: str, *devices: dict) -> dict:
    job = {"id": f"job-{allocation_id}", "image": "img", "command": ["true"], "isolation": "shared"}
    return {"allocation_id": allocation_id, "job": job, "gpus": list(devices)}


def whole(gpu) -> dict:
    return {"index": gpu.index, "uuid": gpu.uuid, "gpu_uuid": gpu.uuid, "kind": "whole", "share": 0}


def mig(gpu, uuid: str) -> dict:
    return {"index": gpu.index, "uuid": uuid, "gpu_uuid": gpu.uuid, "kind": "mig", "share": 0}


def share(gpu, n: int) -> dict:
    return {"index": gpu.index, "uuid": gpu.uuid, "gpu_uuid": gpu.uuid, "kind": "shared", "share": n}


def accept(*assignments: dict):
    """Accept assignments one after another, as the loop does; returns the allocations."""
    running = []
    for data in assignments:
        running.append(parse_assignment(data, INVENTORY, 0.0, held_slots(running)))
    return running


def test_a_mig_instance_is_given_to_the_job_by_its_own_uuid():
    (allocation,) = accept(assignment("a", mig(FIRST, MIG_A)))

    assert allocation.spec.gpu_uuids == (MIG_A,)
    assert allocation.gpus == (FIRST,)


def test_two_jobs_run_side_by_side_on_two_mig_instances_of_one_gpu():
    first, second = accept(assignment("a", mig(FIRST, MIG_A)), assignment("b", mig(FIRST, MIG_B)))

    assert (first.spec.gpu_uuids, second.spec.gpu_uuids) == ((MIG_A,), (MIG_B,))


def test_two_shares_of_one_gpu_go_to_two_jobs_on_the_same_device():
    first, second = accept(assignment("a", share(SECOND, 0)), assignment("b", share(SECOND, 1)))

    assert first.spec.gpu_uuids == second.spec.gpu_uuids == (SECOND.uuid,)
    assert first.spec.slots != second.spec.slots


@pytest.mark.parametrize(
    ("already", "wanted"),
    [
        (assignment("a", mig(FIRST, MIG_A)), assignment("b", mig(FIRST, MIG_A))),  # the same instance twice
        (assignment("a", share(SECOND, 1)), assignment("b", share(SECOND, 1))),  # the same share twice
        (assignment("a", whole(SECOND)), assignment("b", share(SECOND, 0))),  # a share of a GPU held whole
        (assignment("a", share(SECOND, 0)), assignment("b", whole(SECOND))),  # a whole GPU already shared
        (assignment("a", mig(FIRST, MIG_A)), assignment("b", whole(FIRST))),  # a whole GPU cut into MIG
    ],
)
def test_a_device_already_taken_is_refused(already, wanted):
    with pytest.raises(InvalidAssignment) as refused:
        accept(already, wanted)

    assert refused.value.reason == "refused:devices"


def test_a_mig_instance_this_gpu_does_not_have_is_refused():
    with pytest.raises(InvalidAssignment, match="not free"):
        accept(assignment("a", mig(SECOND, "MIG-not-here")))


def test_assignments_from_older_servers_without_kinds_still_mean_whole_gpus():
    (allocation,) = accept(assignment("a", {"index": 1, "uuid": SECOND.uuid}))

    assert allocation.spec.gpu_uuids == (SECOND.uuid,)
    assert allocation.spec.slots == (SECOND.uuid,)
