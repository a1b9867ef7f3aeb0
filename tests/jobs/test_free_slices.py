"""One definition of a free slice: placement's capacity view, offers and the owner's portal agree
with ``slices_free()`` over random marketplaces (units, GPUs going unhealthy or missing, slices
closed by quiet hours, leases made and released)."""

import random

import pytest
from django.db.models import Exists, OuterRef

from marketplace.jobs import placement
from marketplace.jobs.models import Allocation
from marketplace.jobs.offers import free_gpus
from marketplace.jobs.services import allocation_finish
from marketplace.jobs.units import slices_free
from nodes.models import GPU, Slice, Unit
from nodes.selectors import units_for
from tests.conftest import job_make, unit_online


def view_free(engine: placement.Engine) -> dict:
    """Placement's view of the free slices, unit by unit (the one place this test reads it)."""
    engine.view.refresh(force=True)
    return {
        unit_id: {slice_id for slices in state.free.values() for slice_id, _ in slices}
        for unit_id, state in engine.view.units.items()
    }


def free_by_unit(unit_ids) -> dict:
    found = {unit_id: set() for unit_id in unit_ids}
    for slice_id, unit_id in slices_free().filter(unit_id__in=unit_ids).values_list("pk", "unit_id"):
        found[unit_id].add(slice_id)
    return found


def world(seed: int, owner, renter) -> list[Unit]:
    rng = random.Random(seed)
    units = [unit_online(owner, name=f"u{seed}-{n}", gpus=rng.randint(1, 4))[0] for n in range(rng.randint(2, 4))]
    for _ in range(rng.randint(1, 6)):
        placement.job_place(job_id=job_make(renter, gpu_count=rng.randint(1, 2)).pk)
    for allocation in Allocation.objects.filter(released_at__isnull=True):
        if rng.random() < 0.3:
            allocation_finish(allocation=allocation, exit_code=0, reason="")
    for gpu in GPU.objects.filter(unit__in=units):
        if rng.random() < 0.2:
            GPU.objects.filter(pk=gpu.pk).update(healthy=False)
        elif rng.random() < 0.1:
            GPU.objects.filter(pk=gpu.pk).update(present=False)
    for piece in Slice.objects.filter(unit__in=units):
        if rng.random() < 0.25:  # closed by quiet hours or the owner's slicing
            Slice.objects.filter(pk=piece.pk).update(advertised=False)
    Unit.objects.filter(pk__in=[u.pk for u in units]).update(capacity_version=999)  # the view re-reads them
    return units


@pytest.mark.parametrize("seed", range(8))
def test_placement_offers_and_the_portal_count_the_same_free_slices(seed, owner, renter):
    units = world(seed, owner, renter)
    ids = [unit.pk for unit in units]
    expected = free_by_unit(ids)

    assert {k: v for k, v in view_free(placement.Engine()).items() if k in expected} == expected
    offered = set(free_gpus().filter(unit__in=ids).values_list("pk", flat=True))
    with_free = GPU.objects.filter(unit__in=ids).filter(Exists(slices_free().filter(gpu=OuterRef("pk"))))
    assert offered == set(with_free.values_list("pk", flat=True))
    portal = {unit.pk: unit.gpu_free for unit in units_for(owner).filter(pk__in=ids)}
    assert portal == {
        unit_id: len({s.gpu_id for s in Slice.objects.filter(pk__in=free)}) for unit_id, free in expected.items()
    }


def test_a_gpu_closed_by_quiet_hours_is_not_free_in_the_portal(owner):
    unit, _ = unit_online(owner, name="quiet", gpus=2)
    Slice.objects.filter(unit=unit, gpu__index=0).update(advertised=False)

    assert units_for(owner).get(pk=unit.pk).gpu_free == 1
