"""The placement engine's own machinery: the capacity view, versioned claims, the packing policy
deciding among equals, and signatures that found nothing not being searched again."""

import gc
from datetime import timedelta
from unittest import mock

from celery.fixups.django import DjangoWorkerFixup
from django.db import DatabaseError, connection
from django.db.models import F
from django.utils import timezone

from marketplace.celery import app as celery_app
from marketplace.jobs import placement
from marketplace.jobs.models import Allocation, Job, Lease
from marketplace.jobs.placement import Engine, job_place
from marketplace.jobs.services import allocation_finish, job_cancel
from marketplace.jobs.tasks import job_place as job_place_task
from marketplace.jobs.tasks import placement_view_build
from nodes.models import Unit
from nodes.services import unit_policy_update, units_capacity_changed
from tests.conftest import job_make, renter_client, unit_online


def shed(owner, name: str, **kwargs) -> Unit:
    unit, _ = unit_online(owner, name=name, **kwargs)
    return unit


def free_slices(unit: Unit) -> int:
    leased = Lease.objects.filter(slice__unit=unit, released_at__isnull=True).count()
    return unit.slices.filter(advertised=True).count() - leased


def pairs_of_late(renter) -> None:
    """Recent jobs that asked for two GPUs each: the workload the packing policy plans for."""
    for _ in range(4):
        job_cancel(job=job_make(renter, gpu_count=2), actor="test")


class TestPackingPolicy:
    def test_among_equal_prices_the_packing_policy_keeps_room_for_the_workload(self, owner, renter):
        """With two-GPU jobs in the mix, a two-GPU job goes where it leaves two GPUs together
        (fragmentation gradient descent), not where it would leave one stranded (best fit)."""
        three = shed(owner, "three", gpus=3)
        four = shed(owner, "four", gpus=4)
        pairs_of_late(renter)
        job = job_make(renter, gpu_count=2)

        allocation = job_place(job_id=job.pk)

        assert allocation.unit == four
        assert (free_slices(three), free_slices(four)) == (3, 2)

    def test_a_single_gpu_job_goes_where_nothing_is_left_stranded(self, owner, renter):
        """One free GPU on a unit can take a one-GPU job without leaving anything unusable."""
        roomy = shed(owner, "roomy", gpus=4)
        snug = shed(owner, "snug", gpus=3)
        pair = job_place(job_id=job_make(renter, gpu_count=2).pk)
        assert pair.unit == roomy  # 4 -> 2 keeps a pair; 3 -> 1 would strand one
        pairs_of_late(renter)

        single = job_place(job_id=job_make(renter).pk)

        # Taking one of snug's three leaves a pair; taking one of roomy's two would strand one.
        assert single.unit == snug


class TestCapacityView:
    def test_a_claim_on_a_stale_view_loses_cleanly_and_tries_elsewhere(self, owner, renter, settings):
        settings.PLACEMENT_REFRESH_INTERVAL_S = 60  # this worker will not look again by itself
        first = shed(owner, "first", gpus=1, price_per_gpu_hour_micros=1_000_000)
        second = shed(owner, "second", gpus=1, price_per_gpu_hour_micros=2_000_000)
        engine = placement.engine()
        engine.view.refresh()
        # Another worker leases the cheap unit's only GPU behind this worker's view.
        rival = Engine()
        rival.view.refresh()
        (taken,), lost = rival.place([job_make(renter)], placement.Pass())
        assert taken.unit == first and lost == []
        job = job_make(renter)

        allocation = job_place(job_id=job.pk)

        assert allocation.unit == second
        assert engine.stats == {"units_changed": 1, "lost_race": 1, "placed": 1}
        assert Lease.objects.filter(released_at__isnull=True).count() == 2

    def test_a_policy_change_reaches_placement_at_once(self, owner, renter):
        unit = shed(owner, "picky", gpus=2)
        assert job_place(job_id=job_make(renter).pk) is not None
        unit.refresh_from_db()
        unit_policy_update(unit=unit, actor="tests", workload_classes=["inference"])  # as the admin and portal do

        job = job_make(renter, workload_class="training")

        assert job_place(job_id=job.pk) is None
        job.refresh_from_db()
        assert job.pending_reason == {"units_considered": 1, "rejected": {"workload_class": 1}}

    def test_a_freed_slice_is_seen_by_the_next_pass(self, owner, renter):
        unit = shed(owner, "single", gpus=1)
        first = job_place(job_id=job_make(renter).pk)
        waiting = job_make(renter)
        assert job_place(job_id=waiting.pk) is None

        allocation_finish(allocation=first, exit_code=0, reason="")

        assert placement.placement_pass(limit=10) == 1
        assert Allocation.objects.get(job=waiting, released_at__isnull=True).unit == unit

    def test_a_retired_unit_leaves_the_view(self, owner, renter):
        unit = shed(owner, "old")
        placement.engine().view.refresh()
        Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.RETIRED)
        units_capacity_changed([unit.pk])
        job = job_make(renter)

        assert job_place(job_id=job.pk) is None

        job.refresh_from_db()
        assert job.pending_reason == {"units_considered": 0, "rejected": {}}

    def test_a_change_the_refresh_window_missed_is_caught_by_the_version_check(self, owner, renter, settings):
        """A transaction that stamped its change long before it committed falls outside the
        refresh window; the periodic check of every unit's version still finds it."""
        unit = shed(owner, "late", gpus=2)
        view = placement.engine().view
        view.refresh()
        long_ago = timezone.now() - timedelta(minutes=5)
        Unit.objects.filter(pk=unit.pk).update(
            capacity_version=F("capacity_version") + 1, capacity_changed_at=long_ago, workload_classes=["inference"]
        )
        version = Unit.objects.get(pk=unit.pk).capacity_version

        view.refresh(force=True)
        assert view.units[unit.pk].version == version - 1  # outside the window: not seen yet

        view.audited_at -= placement.AUDIT_AFTER_S
        view.refresh(force=True)
        assert view.units[unit.pk].version == version
        assert view.units[unit.pk].profile.workload_classes == ("inference",)

    def test_the_fast_path_rebuilds_the_view_only_once_its_job_is_placed(self, owner, renter):
        shed(owner, "one", gpus=1)
        view = placement.engine().view
        view.refresh()
        view.rebuild_after = 0  # a rebuild is due
        job = job_make(renter)
        states = []
        rebuild = view.rebuild

        def recorded():
            states.append(Job.objects.get(pk=job.pk).state)
            rebuild()

        with mock.patch.object(view, "rebuild", side_effect=recorded):
            allocation = job_place(job_id=job.pk)

        assert allocation is not None
        assert states == [Job.State.PLACED]
        assert view.units  # rebuilt, and whole again

    def test_a_rebuilt_view_is_left_out_of_full_garbage_collections(self, owner):
        shed(owner, "frozen")
        gc.unfreeze()

        placement.engine().view.refresh()

        assert gc.get_freeze_count() > 0

    def test_the_packing_policy_follows_the_recent_workload(self, owner, renter):
        shed(owner, "planner", gpus=4)
        view = placement.engine().view
        view.refresh()
        assert view.task_types == placement.DEFAULT_TASK_TYPES  # nothing seen yet
        pairs_of_late(renter)
        view.choices[0, 0] = "stale"

        view.policy_at -= placement.POLICY_AFTER_S
        view.refresh(force=True)

        assert [(t.num_gpu, t.weight) for t in view.task_types] == [(2, 1.0)]
        assert view.choices == {}  # verdicts under the old policy are gone


class TestWorkerProcess:
    def test_a_new_worker_process_builds_its_view_before_taking_tasks(self, owner):
        unit = shed(owner, "ready")

        placement_view_build()

        assert unit.pk in placement.engine().view.units

    def test_a_view_that_cannot_be_built_at_start_is_left_to_the_first_task(self, owner, caplog):
        with mock.patch.object(placement.CapacityView, "refresh", side_effect=DatabaseError("server gone")):
            placement_view_build()

        assert "could not be built at start" in caplog.text

    def test_the_worker_keeps_its_database_connection_between_tasks(self, db):
        """Celery's Django fix-up closes the connection around every task unless told to reuse
        it; a new connection per task would cost more than most placements."""
        fixup = DjangoWorkerFixup(celery_app)
        connection.ensure_connection()
        before = connection.connection

        for _ in range(10):
            fixup.on_task_prerun(sender=job_place_task)
            fixup.on_task_postrun(sender=job_place_task)

        assert connection.connection is before and not connection.closed_in_transaction


class TestSignatureCache:
    def test_an_identical_job_is_not_searched_for_again_until_capacity_grows(self, owner, renter):
        shed(owner, "small", gpus=2)
        first = job_make(renter, gpu_count=4)
        assert job_place(job_id=first.pk) is None
        twin = job_make(renter, gpu_count=4)

        with mock.patch.object(Engine, "candidates", autospec=True, side_effect=Engine.candidates) as search:
            assert job_place(job_id=twin.pk) is None
            assert search.call_count == 0
            twin.refresh_from_db()
            assert twin.pending_reason == {"units_considered": 1, "rejected": {"capacity": 1}}

            shed(owner, "big", gpus=4)  # capacity grew
            allocation = job_place(job_id=twin.pk)

        assert search.call_count == 1
        assert allocation is not None and allocation.unit.name == "big"

    def test_a_different_signature_is_searched(self, owner, renter):
        shed(owner, "small", gpus=2)
        assert job_place(job_id=job_make(renter, gpu_count=4).pk) is None

        assert job_place(job_id=job_make(renter, gpu_count=2).pk) is not None


class TestResidencyEvidence:
    def test_a_subdivision_job_needing_verification_needs_the_subdivision_attested(self, owner, renter, staff):
        unit = shed(owner, "munich", gpus=2)
        Unit.objects.filter(pk=unit.pk).update(subdivision="DE-BY", location_verified=True)
        units_capacity_changed([unit.pk])
        job = job_make(renter, jurisdictions=["DE-BY"], require_verified_location=True)

        assert job_place(job_id=job.pk) is None
        job.refresh_from_db()
        assert job.pending_reason["rejected"] == {"location_unverified": 1}

        Unit.objects.filter(pk=unit.pk).update(
            attested_country="DE", attested_subdivision="DE-BY", attested_by=staff, attested_at=timezone.now()
        )
        units_capacity_changed([unit.pk])

        assert job_place(job_id=job.pk).unit == unit

    def test_a_country_job_needing_verification_takes_address_evidence(self, owner, renter):
        unit = shed(owner, "munich", gpus=2)
        Unit.objects.filter(pk=unit.pk).update(subdivision="DE-BY", location_verified=True)
        units_capacity_changed([unit.pk])

        allocation = job_place(job_id=job_make(renter, jurisdictions=["EU"], require_verified_location=True).pk)

        assert allocation.unit == unit


class TestWhyPendingInWords:
    def test_the_api_says_why_in_a_sentence(self, owner, renter):
        shed(owner, "paris", country="FR")
        shed(owner, "berlin", country="DE", price_per_gpu_hour_micros=5_000_000)
        api = renter_client(renter)
        job_id = api.post(
            "/api/v1/jobs",
            {"image": "busybox", "command": ["true"], "jurisdictions": ["DE"], "max_price_per_gpu_hour": "4"},
            format="json",
        ).json()["id"]
        job_place(job_id=job_id)

        body = api.get(f"/api/v1/jobs/{job_id}").json()

        assert body["state"] == Job.State.QUEUED
        assert body["pending_reason"] == {"units_considered": 2, "rejected": {"jurisdiction": 1, "price_cap": 1}}
        assert body["pending_summary"] == "0 of 2 units fit: 1 outside the allowed jurisdictions, 1 above the price cap"
