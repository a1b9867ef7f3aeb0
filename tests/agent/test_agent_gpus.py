import sys

import pytest

from nodes.agent import gpus
from nodes.agent.gpus import InventoryError

UNIT = "7b0e4c1a-2f7d-4a53-9a3e-0d5f4b6c8e21"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8xH100-80GB", (8, "H100", 81920)),
        ("1xB200-192GB", (1, "B200", 196608)),
        ("4XRTX-4090-24gb", (4, "RTX-4090", 24576)),
        (" 2xA100-40GB ", (2, "A100", 40960)),
    ],
)
def test_a_simulated_spec_names_count_model_and_vram(spec, expected):
    assert gpus.parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("H100", "expected COUNTxMODEL-VRAMGB"),
        ("8xH100", "expected COUNTxMODEL-VRAMGB"),
        ("8x-80GB", "expected COUNTxMODEL-VRAMGB"),
        ("eightxH100-80GB", "expected COUNTxMODEL-VRAMGB"),
        ("0xH100-80GB", "count must be 1..64"),
        ("65xH100-80GB", "count must be 1..64"),
        ("8xH100-0GB", "VRAM must be at least 1 GB"),
    ],
)
def test_a_bad_spec_is_refused_with_a_clear_reason(spec, complaint):
    with pytest.raises(InventoryError, match=complaint):
        gpus.parse_spec(spec)


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


def test_a_gpu_reports_the_fields_the_heartbeat_expects():
    report = gpus.simulate("1xH100-80GB", UNIT)[0].as_report()

    assert report == {
        "index": 0,
        "uuid": report["uuid"],
        "model": "H100",
        "vram_mb": 81920,
        "driver_version": "",
        "cuda_version": "12.4",
        "mig_mode": False,
        "healthy": True,
    }


def test_discovery_without_nvml_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)

    with pytest.raises(InventoryError, match="nvidia-ml-py"):
        gpus.discover()
