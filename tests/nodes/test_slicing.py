"""The owner's policy decides how GPUs are cut into slices; the agent decides which it offers now."""

from datetime import time

import pytest

from marketplace.jobs.models import Job
from marketplace.jobs.placement import job_place
from nodes import streams
from nodes.models import Slice, Slicing, Unit, UnitTelemetry
from nodes.services import GpuReport, MigReport, unit_heartbeat
from tests.conftest import agent_client, gpus_make, job_make, unit_online

pytestmark = pytest.mark.django_db


def with_migs(report: GpuReport, *profiles: tuple[str, int]) -> GpuReport:
    migs = tuple(MigReport(uuid=f"MIG-{report.uuid}-{n}", profile=p, memory_mb=m) for n, (p, m) in enumerate(profiles))
    return GpuReport(**{**vars(report), "mig_mode": True, "mig_instances": migs})


def beat(unit: Unit, reports: list[GpuReport], **extra) -> None:
    unit_heartbeat(unit=Unit.objects.get(pk=unit.pk), gpus=reports, **extra)


def offered(unit: Unit):
    return Slice.objects.filter(unit=unit, advertised=True).order_by("gpu__index", "device_uuid", "share_index")


@pytest.fixture
def shed(owner):
    unit, _ = unit_online(owner, name="shed", gpus=2, price_per_gpu_hour_micros=3_000_000)
    return unit


def test_whole_gpus_are_sold_as_one_slice_each(shed):
    slices = list(offered(shed))

    assert [(s.kind, s.isolation, s.vram_mb, s.price_per_gpu_hour_micros) for s in slices] == [
        ("whole", "gpu", 81920, 3_000_000),
        ("whole", "gpu", 81920, 3_000_000),
    ]
    assert [s.device_uuid for s in slices] == ["GPU-shed-0", "GPU-shed-1"]


def test_shared_slicing_cuts_each_gpu_into_cheaper_fractions(shed):
    Unit.objects.filter(pk=shed.pk).update(slicing=Slicing.SHARED, shared_fraction=4)
    beat(shed, gpus_make(2, prefix="GPU-shed"))

    slices = list(offered(shed))
    assert len(slices) == 8
    assert {(s.kind, s.isolation, s.vram_mb, s.price_per_gpu_hour_micros) for s in slices} == {
        ("shared", "shared", 20480, 750_000)
    }
    assert not Slice.objects.filter(unit=shed, kind="whole", advertised=True).exists()


def test_mig_slicing_sells_each_mig_instance_priced_by_its_memory(shed):
    Unit.objects.filter(pk=shed.pk).update(slicing=Slicing.MIG)
    first, second = gpus_make(2, prefix="GPU-shed")
    beat(shed, [with_migs(first, ("3g.40gb", 40960), ("3g.40gb", 40960)), second])

    slices = list(offered(shed))
    assert [(s.kind, s.device_uuid, s.vram_mb, s.price_per_gpu_hour_micros) for s in slices] == [
        ("mig", "MIG-GPU-shed-0-0", 40960, 1_500_000),
        ("mig", "MIG-GPU-shed-0-1", 40960, 1_500_000),
        ("whole", "GPU-shed-1", 81920, 3_000_000),  # no MIG instances: sold whole rather than not at all
    ]


def test_a_job_asking_for_two_gpus_never_gets_two_shares_of_one(shed, renter):
    Unit.objects.filter(pk=shed.pk).update(slicing=Slicing.SHARED, shared_fraction=2)
    beat(shed, gpus_make(2, prefix="GPU-shed"))

    allocation = job_place(job_id=job_make(renter, gpu_count=2, isolation="shared").pk)

    gpus = {lease.slice.gpu_id for lease in allocation.leases.select_related("slice")}
    assert len(gpus) == 2


def test_shared_slices_do_not_serve_jobs_that_want_whole_gpus(shed, renter):
    Unit.objects.filter(pk=shed.pk).update(slicing=Slicing.SHARED)
    beat(shed, gpus_make(2, prefix="GPU-shed"))

    job = job_make(renter, isolation="gpu")
    assert job_place(job_id=job.pk) is None
    assert Job.objects.get(pk=job.pk).pending_reason["rejected"] == {"isolation": 1}


def test_the_price_cap_applies_to_the_slice_price(shed, renter):
    Unit.objects.filter(pk=shed.pk).update(slicing=Slicing.SHARED, shared_fraction=4)
    beat(shed, gpus_make(2, prefix="GPU-shed"))

    assert job_place(job_id=job_make(renter, isolation="shared", max_price_per_gpu_hour_micros=1_000_000).pk)
    capped = job_make(renter, isolation="shared", max_price_per_gpu_hour_micros=500_000)
    assert job_place(job_id=capped.pk) is None
    assert Job.objects.get(pk=capped.pk).pending_reason["rejected"] == {"price_cap": 1}


def test_gpus_the_agent_does_not_advertise_take_no_new_work(shed, renter):
    beat(shed, gpus_make(2, prefix="GPU-shed"), advertise=["GPU-shed-1"], limits={"in_force": ["quiet_hours"]})

    assert [s.device_uuid for s in offered(shed)] == ["GPU-shed-1"]
    allocation = job_place(job_id=job_make(renter).pk)
    assert [lease.slice.device_uuid for lease in allocation.leases.all()] == ["GPU-shed-1"]
    assert job_place(job_id=job_make(renter).pk) is None
    assert Unit.objects.get(pk=shed.pk).limits == {"in_force": ["quiet_hours"]}


def test_capacity_comes_back_when_the_agent_advertises_again(shed):
    beat(shed, gpus_make(2, prefix="GPU-shed"), advertise=[])
    assert not offered(shed).exists()

    beat(shed, gpus_make(2, prefix="GPU-shed"))

    assert offered(shed).count() == 2


def test_the_heartbeat_answer_carries_the_owners_policy(owner):
    unit, credential = unit_online(owner, name="quiet", gpus=1)
    Unit.objects.filter(pk=unit.pk).update(
        quiet_hours_start=time(22), quiet_hours_end=time(7), time_zone="Europe/Berlin",
        quiet_hours_max_gpus=1, quiet_hours_power_cap_w=300, power_budget_kw="9.50",
        thermal_stop_c=80, thermal_resume_c=70,
    )  # fmt: skip
    body = {"gpus": [vars(g) for g in gpus_make(1, prefix="GPU-quiet")], "limits": {"in_force": []}}

    policy = agent_client(credential).post("/api/agent/v1/heartbeat", body, format="json").json()["policy"]

    assert policy["quiet_hours"] == {
        "start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin", "max_gpus": 1, "power_cap_w": 300
    }  # fmt: skip
    assert policy["power_budget_w"] == 9500
    assert (policy["thermal_stop_c"], policy["thermal_resume_c"]) == (80, 70)
    assert policy["slicing"] == "whole"


def latest_readings(unit) -> list[tuple]:
    gpus = streams.telemetry_latest([unit.pk])[str(unit.pk)]["gpus"]
    return [(g["uuid"], g["temperature_c"], g["power_w"]) for g in gpus]


def test_telemetry_from_the_heartbeat_is_kept_per_gpu_outside_the_gpu_rows(owner):
    unit, credential = unit_online(owner, name="warm", gpus=1)
    gpu = {**vars(gpus_make(1, prefix="GPU-warm")[0]), "temperature_c": 71, "power_w": 612}
    before = UnitTelemetry.objects.filter(unit=unit).count()

    response = agent_client(credential).post("/api/agent/v1/heartbeat", {"gpus": [gpu]}, format="json")
    again = agent_client(credential).post("/api/agent/v1/heartbeat", {"gpus": [gpu | {"temperature_c": 72}]},
                                          format="json")  # fmt: skip

    assert (response.status_code, again.status_code) == (200, 200)
    assert latest_readings(unit) == [(gpu["uuid"], 72, 612)]
    # The history takes one reading per STREAM_TELEMETRY_SAMPLE_S, not one per heartbeat.
    assert UnitTelemetry.objects.filter(unit=unit).count() - before <= 1
    assert UnitTelemetry.objects.filter(unit=unit).exists()


def test_a_real_gpus_fractional_power_reading_is_accepted(owner):
    """NVML reports milliwatts, so the agent sends watts with decimals (seen on an H200)."""
    unit, credential = unit_online(owner, name="h200", gpus=1)
    gpu = {**vars(gpus_make(1, prefix="GPU-h200")[0]), "power_w": 112.2, "power_limit_w": 700.0, "ecc_errors": 0}

    response = agent_client(credential).post("/api/agent/v1/heartbeat", {"gpus": [gpu]}, format="json")

    assert response.status_code == 200, response.content
    assert latest_readings(unit)[0][2] == 112


def test_the_inventory_a_real_h200_reported_is_accepted_as_it_is(owner):
    """tests/data/h200_inventory.json is what the agent read through NVML on a real H200."""
    import json
    from pathlib import Path

    reported = json.loads((Path(__file__).parents[1] / "data" / "h200_inventory.json").read_text())
    unit, credential = unit_online(owner, name="real", gpus=0)

    response = agent_client(credential).post("/api/agent/v1/heartbeat", {"gpus": reported}, format="json")

    assert response.status_code == 200, response.content
    gpu = unit.gpus.get()
    assert (gpu.model, gpu.vram_mb, gpu.driver_version, gpu.cuda_version) == ("H200", 143771, "580.159.04", "13.0")
    assert Slice.objects.filter(unit=unit, advertised=True).count() == 1
