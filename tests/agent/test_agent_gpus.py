import sys

import pytest

from nodes.agent import gpus
from nodes.agent.gpus import InventoryError
from nodes.agent.simspec import SimSpec, SpecError, parse_spec

UNIT = "7b0e4c1a-2f7d-4a53-9a3e-0d5f4b6c8e21"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8xH100-80GB", SimSpec(8, "H100", 81920)),
        ("1xB200-192GB", SimSpec(1, "B200", 196608)),
        ("4XRTX-4090-24gb", SimSpec(4, "RTX-4090", 24576)),
        (" 2xA100-40GB ", SimSpec(2, "A100", 40960)),
        ("4xB200", SimSpec(4, "B200", 183359)),
        ("2xh200", SimSpec(2, "H200", 143771)),
        ("1xL40S", SimSpec(1, "L40S", 46068)),
        ("2xH100-80GB:mig=3g.40gb+3g.40gb", SimSpec(2, "H100", 81920, ("3g.40gb", "3g.40gb"))),
        ("1xH100:mig=1g.10gb*7", SimSpec(1, "H100", 81559, ("1g.10gb",) * 7)),
        ("1xA100:mig=1g.10gb*2+2G.20GB", SimSpec(1, "A100", 81920, ("1g.10gb", "1g.10gb", "2g.20gb"))),
    ],
)
def test_a_simulated_spec_names_count_model_vram_and_mig_layout(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("H100", "expected COUNTxMODEL"),
        ("8x-80GB", "expected COUNTxMODEL"),
        ("eightxH100-80GB", "expected COUNTxMODEL"),
        ("0xH100-80GB", "count must be 1..64"),
        ("65xH100-80GB", "count must be 1..64"),
        ("8xH100-0GB", "VRAM must be at least 1 GB"),
        ("8xFOO", "give FOO's VRAM, e.g. 2xFOO-24GB"),
        ("2xH100:mig=", "MIG term '' is not PROFILE"),
        ("2xH100:mig=4g.40gb+3g", "MIG term '3g' is not PROFILE"),
        ("2xH100:mig=1g.10gb*8", "uses 8 compute slices, a GPU has 1..7"),
        ("2xH100:mig=4g.40gb+4g.40gb", "uses 8 compute slices"),
        ("2xL40S:mig=3g.40gb+3g.40gb", "need more memory than the GPU's 46068 MiB"),
    ],
)
def test_a_bad_spec_is_refused_with_a_clear_reason(spec, complaint):
    with pytest.raises(SpecError, match=f"bad simulated inventory .*{complaint}"):
        parse_spec(spec)


def test_simulating_a_bad_spec_is_an_inventory_error():
    with pytest.raises(InventoryError, match="bad simulated inventory '8xFOO'"):
        gpus.simulate("8xFOO", UNIT)


def test_simulated_gpus_keep_their_uuids_across_restarts():
    first, again = gpus.simulate("8xH100-80GB", UNIT), gpus.simulate("8xH100-80GB", UNIT)

    assert [g.uuid for g in first] == [g.uuid for g in again]
    assert len({g.uuid for g in first}) == 8
    assert all(g.uuid.startswith("GPU-") for g in first)
    assert [g.index for g in first] == list(range(8))


def test_another_unit_gets_other_gpu_uuids():
    other = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"

    mine = {g.uuid for g in gpus.simulate("2xH100-80GB", UNIT)}
    theirs = {g.uuid for g in gpus.simulate("2xH100-80GB", other)}

    assert not mine & theirs


def test_a_simulated_mig_layout_gives_every_gpu_its_instances_with_stable_uuids():
    first = gpus.simulate("2xH100-80GB:mig=3g.40gb+1g.10gb*2", UNIT)
    again = gpus.simulate("2xH100-80GB:mig=3g.40gb+1g.10gb*2", UNIT)

    assert all(gpu.mig_mode for gpu in first)
    assert [m.profile for m in first[1].mig_instances] == ["3g.40gb", "1g.10gb", "1g.10gb"]
    assert [m.memory_mb for m in first[1].mig_instances] == [40960, 10240, 10240]
    uuids = [m.uuid for gpu in first for m in gpu.mig_instances]
    assert uuids == [m.uuid for gpu in again for m in gpu.mig_instances]
    assert len(set(uuids)) == 6 and all(uuid.startswith("MIG-") for uuid in uuids)


def test_a_gpu_reports_the_fields_the_heartbeat_expects_and_its_telemetry():
    report = gpus.simulate("1xH100-80GB", UNIT)[0].as_report()

    assert report == {
        "index": 0,
        "uuid": report["uuid"],
        "model": "H100",
        "vram_mb": 81920,
        "driver_version": "570.133.20",
        "cuda_version": "12.8",
        "mig_mode": False,
        "healthy": True,
        "temperature_c": 34,
        "power_w": 71.0,
        "power_limit_w": 700.0,
        "ecc_errors": 0,
        "utilization_pct": 0,
        "mig_instances": [],
        "problems": [],
    }


def test_a_mig_gpu_reports_its_instances():
    report = gpus.simulate("1xH100-80GB:mig=7g.80gb", UNIT)[0].as_report()

    assert report["mig_mode"] is True
    assert report["mig_instances"] == [
        {"uuid": report["mig_instances"][0]["uuid"], "profile": "7g.80gb", "memory_mb": 81920}
    ]
    assert report["utilization_pct"] is None  # NVML cannot tell it for a MIG-enabled GPU


def test_discovery_without_nvml_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)

    with pytest.raises(InventoryError, match="nvidia-ml-py"):
        gpus.discover()
