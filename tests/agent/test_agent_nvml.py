"""Discovery through an NVML-like module: the same code reads pynvml on a real machine."""

import sys

import pytest

from nodes.agent import gpus
from nodes.agent.fake_nvml import FakeDevice, FakeMig, FakeNvml, NVMLError

UUID = "GPU-5d1a3c42-0b1e-4f6a-9e2d-7c8b9a0f1e23"


def device(**overrides) -> FakeDevice:
    fields = {"name": "NVIDIA H100 80GB HBM3", "uuid": UUID, "memory_mb": 81559} | overrides
    return FakeDevice(**fields)


def read_one(dev: FakeDevice, **nvml) -> gpus.Gpu:
    [gpu] = gpus.read_gpus(FakeNvml([dev], **nvml))
    return gpu


def test_discovery_reads_every_field_of_a_gpu():
    dev = device(temperature_c=61, power_mw=412_345, power_limit_mw=650_000, ecc_uncorrected=0, utilization_pct=87)

    gpu = read_one(dev, driver="570.133.20", cuda=12080)

    assert gpu == gpus.Gpu(
        index=0,
        uuid=UUID,
        model="H100",
        vram_mb=81559,
        driver_version="570.133.20",
        cuda_version="12.8",
        mig_mode=False,
        healthy=True,
        temperature_c=61,
        power_w=412.3,
        power_limit_w=650.0,
        ecc_errors=0,
        utilization_pct=87,
    )


def test_discovery_reads_mig_instances_with_profile_uuid_and_memory():
    migs = [
        FakeMig("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "MIG-a", 40448, 3),
        FakeMig("NVIDIA H100 MIG 1g.10gb", "MIG-b", 9856, 1),
    ]

    gpu = read_one(device(migs=migs, mig_enabled=True))

    assert gpu.mig_mode
    assert gpu.mig_instances == (
        gpus.MigInstance(uuid="MIG-a", profile="3g.40gb", memory_mb=40448),
        gpus.MigInstance(uuid="MIG-b", profile="1g.10gb", memory_mb=9856),
    )


def test_a_mig_profile_missing_from_the_name_is_rebuilt_from_the_instance_size():
    gpu = read_one(device(migs=[FakeMig("MIG device", "MIG-c", 19968, 2)], mig_enabled=True))

    assert gpu.mig_instances[0].profile == "2g.20gb"


def test_a_gpu_with_mig_off_lists_no_instances_even_if_nvml_has_some():
    gpu = read_one(device(migs=[FakeMig("NVIDIA H100 MIG 7g.80gb", "MIG-d", 80000, 7)], mig_enabled=False))

    assert not gpu.mig_mode and gpu.mig_instances == ()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("nvmlDeviceGetTemperature", "temperature_c"),
        ("nvmlDeviceGetPowerUsage", "power_w"),
        ("nvmlDeviceGetEnforcedPowerLimit", "power_limit_w"),
        ("nvmlDeviceGetTotalEccErrors", "ecc_errors"),
        ("nvmlDeviceGetUtilizationRates", "utilization_pct"),
    ],
)
def test_a_field_the_board_does_not_support_is_none_and_the_gpu_stays_healthy(call, field):
    gpu = read_one(device(unsupported={call}))

    assert getattr(gpu, field) is None
    assert gpu.healthy and gpu.problems == ()


def test_unsupported_mig_mode_means_mig_off():
    gpu = read_one(device(unsupported={"nvmlDeviceGetMigMode"}))

    assert not gpu.mig_mode and gpu.healthy


def test_a_field_nvml_fails_to_read_makes_the_gpu_unhealthy_and_says_which():
    gpu = read_one(device(failing={"nvmlDeviceGetTemperature"}))

    assert gpu.temperature_c is None
    assert not gpu.healthy
    assert gpu.problems == ("NVML cannot read temperature: GPU is lost",)


def test_uncorrected_ecc_errors_make_a_gpu_unhealthy():
    gpu = read_one(device(ecc_uncorrected=3))

    assert gpu.ecc_errors == 3
    assert not gpu.healthy and gpu.problems == ("3 uncorrected ECC errors",)


def test_a_gpu_at_its_slowdown_temperature_is_unhealthy():
    assert read_one(device(temperature_c=86, slowdown_c=87)).healthy
    hot = read_one(device(temperature_c=87, slowdown_c=87))

    assert not hot.healthy and hot.problems == ("87 C, at or above 87 C",)


def test_without_a_slowdown_temperature_the_critical_one_is_90_c():
    quiet = {"nvmlDeviceGetTemperatureThreshold"}

    assert read_one(device(temperature_c=89, unsupported=quiet)).healthy
    assert not read_one(device(temperature_c=90, unsupported=quiet)).healthy


def test_nvml_that_cannot_start_is_an_inventory_error():
    class Broken(FakeNvml):
        def nvmlInit(self) -> None:
            raise NVMLError("Driver Not Loaded")

    with pytest.raises(gpus.InventoryError, match=r"NVML failed to start \(Driver Not Loaded\)"):
        gpus.read_gpus(Broken([]))


def test_nvml_is_shut_down_after_discovery():
    nvml = FakeNvml([device()])

    gpus.read_gpus(nvml)

    assert not nvml.initialised


def test_older_nvml_bindings_that_answer_bytes_are_understood():
    class Old(FakeNvml):
        def nvmlSystemGetDriverVersion(self) -> bytes:  # type: ignore[override]
            return b"535.104.05"

    [gpu] = gpus.read_gpus(Old([device()]))

    assert gpu.driver_version == "535.104.05"


def test_discover_reads_the_pynvml_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([device(), device(uuid="GPU-2", name="NVIDIA B200")]))

    assert [(g.index, g.model) for g in gpus.discover()] == [(0, "H100"), (1, "B200")]


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX-6000-Ada"),
        ("Quadro RTX 8000", "RTX-8000"),
        ("NVIDIA", "unknown"),
    ],
)
def test_model_names_are_normalised_to_what_renters_ask_for(name, model):
    assert gpus.normalise_model(name) == model
