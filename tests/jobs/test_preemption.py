"""Interruptible jobs: cheaper, stopped with notice when an on-demand job needs their GPUs, queued
again, and billed only up to the notice."""

from datetime import timedelta
from unittest import mock

from django.utils import timezone

from billing.services import usage_post
from marketplace.jobs.models import Allocation, Job, Lease
from marketplace.jobs.pending import pending_summary
from marketplace.jobs.placement import PREEMPTION_WAIT_S, job_place
from marketplace.jobs.selectors import allocation_usage
from marketplace.jobs.services import allocation_finish, allocation_pull, allocation_start
from marketplace.jobs.usage import SampleReport, usage_record
from marketplace.kernel.models import AuditEvent
from tests.conftest import agent_client, allocation_since, gpus_make, job_make, unit_online

PRICE = 2_000_000


def shed(owner, name: str, gpus: int = 2, **policy):
    return unit_online(owner, name=name, gpus=gpus, price_per_gpu_hour_micros=PRICE, **policy)


def running(job: Job) -> Allocation:
    """Place the job, and have its unit's agent pick it up and start it."""
    allocation = job_place(job_id=job.pk)
    assert allocation is not None
    assert allocation_pull(unit=allocation.unit) == allocation
    allocation_start(allocation=allocation)
    return allocation


def heartbeat(unit, credential: str, *, running_ids: list) -> dict:
    body = {"gpus": [vars(g) for g in gpus_make(2, prefix=f"GPU-{unit.name}")], "running": running_ids}
    response = agent_client(credential).post("/api/agent/v1/heartbeat", body, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def stored(instance):
    instance.refresh_from_db()
    return instance


class TestPrice:
    def test_an_interruptible_job_pays_the_units_interruptible_share(self, owner, renter):
        shed(owner, "cheap", interruptible_price_percent=40)

        allocation = job_place(job_id=job_make(renter, interruptible=True).pk)

        assert allocation.price_per_gpu_hour_micros == PRICE * 40 // 100
        assert allocation.interruptible is True
        record = AuditEvent.objects.get(action="job.placed", subject_id=allocation.job_id).data["policy"]
        assert record["price"]["interruptible"] is True
        assert record["price"]["interruptible_price_percent"] == 40

    def test_the_price_cap_is_held_against_what_the_job_would_pay(self, owner, renter):
        shed(owner, "shed", interruptible_price_percent=50)
        cap = PRICE * 3 // 4  # below the price, above the interruptible price

        on_demand = job_make(renter, max_price_per_gpu_hour_micros=cap)
        assert job_place(job_id=on_demand.pk) is None
        assert stored(on_demand).pending_reason["rejected"] == {"price_cap": 1}

        interruptible = job_make(renter, max_price_per_gpu_hour_micros=cap, interruptible=True)
        assert job_place(job_id=interruptible.pk).price_per_gpu_hour_micros == PRICE // 2

    def test_an_on_demand_job_pays_the_full_price(self, owner, renter):
        shed(owner, "shed", interruptible_price_percent=30)

        assert job_place(job_id=job_make(renter).pk).price_per_gpu_hour_micros == PRICE


class TestPreemption:
    def test_an_on_demand_job_stops_an_interruptible_one_and_takes_its_gpus(self, owner, renter, stranger):
        unit, credential = shed(owner, "full")
        spot = running(job_make(stranger, gpu_count=2, interruptible=True, restartable=True))
        needy = job_make(renter, gpu_count=2)

        assert job_place(job_id=needy.pk) is None

        spot.refresh_from_db()
        assert spot.preempted_at is not None and spot.preempted_by_id == needy.pk
        assert spot.released_at is None  # the GPUs stay busy until the agent has stopped the job
        needy.refresh_from_db()
        assert needy.state == Job.State.QUEUED
        assert needy.pending_reason["preempting"]["allocations"] == 1
        assert "1 interruptible job is being stopped to make room" in pending_summary(needy.pending_reason)
        assert AuditEvent.objects.filter(action="job.preempted", subject_id=spot.job_id).exists()
        # The agent hears it at its next heartbeat: its notice.
        reply = heartbeat(unit, credential, running_ids=[str(spot.pk)])
        assert reply["preempt"] == [str(spot.pk)]
        assert reply["cancel"] == []

        with mock.patch("marketplace.jobs.services.placement_request") as requested:
            allocation_finish(allocation=spot, exit_code=0, reason="preempted")  # it checkpointed and left

        # The waiting job is placed first, then the interrupted one looks for room again.
        assert requested.call_args_list[-2:] == [mock.call(needy.pk), mock.call(spot.job_id)]
        assert job_place(job_id=needy.pk) is not None
        interrupted = Job.objects.get(pk=spot.job_id)
        assert interrupted.state == Job.State.QUEUED  # to run again, elsewhere or later
        assert interrupted.attempts == 0  # being preempted is not one of its tries
        assert stored(spot).release_reason == "preempted"
        taken = Allocation.objects.get(job=needy, released_at__isnull=True)
        assert taken.unit == unit and taken.price_per_gpu_hour_micros == PRICE
        assert stored(needy).state == Job.State.PLACED
        assert heartbeat(unit, credential, running_ids=[])["preempt"] == []

    def test_the_spot_jobs_gpus_are_found_in_the_steady_state_as_the_agent_advertises_them(
        self, owner, renter, stranger
    ):
        """After the start, the unit's heartbeats go on advertising the GPUs an interruptible job
        holds (the agent keeps them open for an on-demand job): placement still stops it. A GPU
        the agent withdraws (a backyard limit in force) is not taken that way."""
        unit, credential = shed(owner, "full")
        spot = running(job_make(stranger, gpu_count=2, interruptible=True, restartable=True))
        gpus = [vars(g) for g in gpus_make(2, prefix=f"GPU-{unit.name}")]
        beat = {"gpus": gpus, "running": [str(spot.pk)], "limits": {"in_force": [], "advertised_gpus": 2, "gpus": 2}}
        client = agent_client(credential)

        hot = {**beat, "advertise": [], "limits": {"in_force": ["thermal"], "advertised_gpus": 0, "gpus": 2}}
        assert client.post("/api/agent/v1/heartbeat", hot, format="json").status_code == 200
        held_back = job_make(renter, gpu_count=2)
        assert job_place(job_id=held_back.pk) is None
        assert stored(spot).preempted_at is None

        opened = {**beat, "advertise": [g["uuid"] for g in gpus]}
        assert client.post("/api/agent/v1/heartbeat", opened, format="json").status_code == 200
        assert job_place(job_id=job_make(renter, gpu_count=2).pk) is None
        assert stored(spot).preempted_at is not None

    def test_free_gpus_elsewhere_come_before_stopping_anyone(self, owner, renter, stranger):
        shed(owner, "busy", gpus=1)
        spot = running(job_make(stranger, interruptible=True))
        _, _ = shed(owner, "idle", gpus=1)

        allocation = job_place(job_id=job_make(renter).pk)

        assert allocation.unit.name == "idle"
        assert stored(spot).preempted_at is None

    def test_interruptible_jobs_never_stop_each_other(self, owner, renter, stranger):
        shed(owner, "one", gpus=1)
        spot = running(job_make(stranger, interruptible=True))
        other = job_make(renter, interruptible=True)

        assert job_place(job_id=other.pk) is None

        assert stored(spot).preempted_at is None
        assert "preempting" not in stored(other).pending_reason

    def test_on_demand_work_is_never_stopped(self, owner, renter, stranger):
        shed(owner, "one", gpus=1)
        firm = running(job_make(stranger))
        needy = job_make(renter)

        assert job_place(job_id=needy.pk) is None

        assert stored(firm).preempted_at is None
        assert stored(needy).pending_reason["rejected"] == {"capacity": 1}

    def test_the_unit_where_fewest_jobs_must_stop_is_chosen(self, owner, renter, stranger):
        shed(owner, "pairs", gpus=2)
        singles = [running(job_make(stranger, interruptible=True)) for _ in range(2)]
        shed(owner, "whole", gpus=2)
        pair = running(job_make(stranger, gpu_count=2, interruptible=True))
        assert pair.unit.name == "whole" and {a.unit.name for a in singles} == {"pairs"}

        assert job_place(job_id=job_make(renter, gpu_count=2).pk) is None

        assert stored(pair).preempted_at is not None
        assert [stored(a).preempted_at for a in singles] == [None, None]

    def test_a_job_waiting_on_a_preemption_does_not_stop_more(self, owner, renter, stranger):
        shed(owner, "one", gpus=1)
        first = running(job_make(stranger, interruptible=True))
        shed(owner, "two", gpus=1)
        second = running(job_make(stranger, interruptible=True))
        needy = job_make(renter)
        assert job_place(job_id=needy.pk) is None
        assert Allocation.objects.filter(preempted_by=needy).count() == 1

        assert job_place(job_id=needy.pk) is None  # the next pass, before the agent has answered

        assert Allocation.objects.filter(preempted_by=needy).count() == 1
        # Another on-demand job stops the other one.
        assert job_place(job_id=job_make(renter).pk) is None
        assert {stored(first).preempted_at is None, stored(second).preempted_at is None} == {False}

    def test_a_preemption_that_never_completes_is_given_up_after_a_while(self, owner, renter, stranger):
        shed(owner, "one", gpus=1)
        running(job_make(stranger, interruptible=True))
        shed(owner, "two", gpus=1)
        other = running(job_make(stranger, interruptible=True))
        needy = job_make(renter)
        assert job_place(job_id=needy.pk) is None
        long_ago = (timezone.now() - timedelta(seconds=PREEMPTION_WAIT_S + 1)).isoformat()
        reason = stored(needy).pending_reason
        Job.objects.filter(pk=needy.pk).update(
            pending_reason={**reason, "preempting": {"allocations": 1, "since": long_ago}}
        )

        assert job_place(job_id=needy.pk) is None

        assert stored(other).preempted_by_id == needy.pk

    def test_a_node_job_stops_every_interruptible_job_on_a_unit_but_not_on_demand_work(self, owner, renter, stranger):
        shed(owner, "mixed", gpus=2, isolation_levels=["gpu", "node"])
        firm = running(job_make(stranger))
        mixed_spot = running(job_make(stranger, interruptible=True))
        shed(owner, "spots", gpus=2, isolation_levels=["gpu", "node"])
        spots = [running(job_make(stranger, interruptible=True)) for _ in range(2)]
        assert {a.unit.name for a in spots} == {"spots"}

        assert job_place(job_id=job_make(renter, isolation="node", gpu_count=2).pk) is None

        assert [stored(a).preempted_at is not None for a in spots] == [True, True]
        assert stored(mixed_spot).preempted_at is None and stored(firm).preempted_at is None

    def test_a_preempted_job_that_finished_by_itself_meanwhile_is_done(self, owner, renter, stranger):
        shed(owner, "one", gpus=1)
        spot = running(job_make(stranger, interruptible=True))
        assert job_place(job_id=job_make(renter).pk) is None

        allocation_finish(allocation=stored(spot), exit_code=0, reason="")

        assert Job.objects.get(pk=spot.job_id).state == Job.State.SUCCEEDED
        assert Lease.objects.filter(allocation=spot, released_at__isnull=True).count() == 0


class TestBilling:
    def test_usage_after_the_notice_is_not_billed(self, owner, renter, stranger):
        shed(owner, "one", gpus=1)
        spot = running(job_make(stranger, interruptible=True))
        assert job_place(job_id=job_make(renter).pk) is None
        notice = stored(spot).preempted_at
        allocation_since(spot, notice - timedelta(minutes=5))
        before = SampleReport(seq=1, gpu_ms=60_000, recorded_at=notice - timedelta(seconds=1))
        grace = SampleReport(seq=2, gpu_ms=30_000, recorded_at=notice + timedelta(seconds=20))

        usage_record(allocation=spot, samples=[before, grace])
        usage_post(allocation_id=spot.pk)

        used_ms, charged = allocation_usage(spot)
        assert used_ms == 60_000
        assert charged == 60_000 * spot.price_per_gpu_hour_micros // 3_600_000


class TestGivingWay:
    """The stop asks for two placements at once (the waiting job's and the stopped one's), which
    workers may run in either order: the stopped job must not take its GPUs back."""

    def stopped_for(self, owner, renter, stranger):
        shed(owner, "full")
        spot = running(job_make(stranger, gpu_count=2, interruptible=True, restartable=True))
        needy = job_make(renter, gpu_count=2)
        assert job_place(job_id=needy.pk) is None  # it stops the spot job
        allocation_finish(allocation=stored(spot), exit_code=137, reason="preempted")
        return spot, needy

    def test_the_stopped_job_waits_while_the_job_that_stopped_it_is_queued(self, owner, renter, stranger):
        spot, needy = self.stopped_for(owner, renter, stranger)

        assert job_place(job_id=spot.job_id) is None  # its placement ran first: it gives way
        assert job_place(job_id=needy.pk) is not None
        assert Job.objects.get(pk=spot.job_id).state == Job.State.QUEUED

    def test_it_gives_way_only_for_so_long(self, owner, renter, stranger):
        spot, needy = self.stopped_for(owner, renter, stranger)
        Allocation.objects.filter(pk=spot.pk).update(
            released_at=timezone.now() - timedelta(seconds=PREEMPTION_WAIT_S + 1)
        )

        assert job_place(job_id=spot.job_id) is not None
