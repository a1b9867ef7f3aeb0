"""A stand-in for the `pynvml` module, so that `--simulate` and the tests run the real discovery code.

It implements only the calls `gpus.read_gpus` makes, with pynvml's names, constants and error
classes. A device can be told to answer a call with NotSupported (as consumer boards do for ECC)
or with another NVML error (as a GPU that fell off the bus does).
"""

import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

from nodes.agent.simspec import SimSpec, mig_memory_gb

# Fixed namespace so that a unit's simulated GPUs keep their uuids across restarts.
SIMULATED_NAMESPACE = uuid.UUID("6a1f6a52-8f0e-4d8e-9a57-3c1f9a6b2e10")
DEFAULT_POWER_LIMIT_W = {"H100": 700, "H200": 700, "B200": 1000, "A100": 400, "L40S": 350}

NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_VOLATILE_ECC = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    def __str__(self) -> str:
        return "Not Supported"


class NVMLError_NotFound(NVMLError):
    def __str__(self) -> str:
        return "Not Found"


class NVMLError_GpuIsLost(NVMLError):
    def __str__(self) -> str:
        return "GPU is lost"


@dataclass
class FakeMig:
    name: str
    uuid: str
    memory_mb: int
    slices: int


@dataclass
class FakeDevice:
    name: str
    uuid: str
    memory_mb: int
    temperature_c: int = 34
    slowdown_c: int = 90
    power_mw: int = 71_000
    power_limit_mw: int = 700_000
    default_power_limit_mw: int = 700_000
    ecc_uncorrected: int = 0
    utilization_pct: int = 0
    migs: list[FakeMig] = field(default_factory=list)
    mig_enabled: bool = False
    unsupported: set[str] = field(default_factory=set)  # call names answered with NotSupported
    failing: set[str] = field(default_factory=set)  # call names answered with GpuIsLost

    def answer(self, call: str, value: object) -> object:
        if call in self.failing:
            raise NVMLError_GpuIsLost()
        if call in self.unsupported:
            raise NVMLError_NotSupported()
        return value


class FakeNvml:
    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
    NVML_VOLATILE_ECC = NVML_VOLATILE_ECC
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE

    def __init__(self, devices: list[FakeDevice], driver: str = "570.133.20", cuda: int = 12080) -> None:
        self.devices = devices
        self.driver, self.cuda = driver, cuda
        self.initialised = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        return self.devices[index]

    def nvmlDeviceGetUUID(self, handle: FakeDevice | FakeMig) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeDevice | FakeMig) -> str:
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice | FakeMig) -> SimpleNamespace:
        total = handle.memory_mb * 2**20
        return SimpleNamespace(total=total, used=0, free=total)

    def nvmlDeviceGetTemperature(self, handle: FakeDevice, sensor: int) -> object:
        return handle.answer("nvmlDeviceGetTemperature", handle.temperature_c)

    def nvmlDeviceGetTemperatureThreshold(self, handle: FakeDevice, threshold: int) -> object:
        return handle.answer("nvmlDeviceGetTemperatureThreshold", handle.slowdown_c)

    def nvmlDeviceGetPowerUsage(self, handle: FakeDevice) -> object:
        return handle.answer("nvmlDeviceGetPowerUsage", handle.power_mw)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeDevice) -> object:
        return handle.answer("nvmlDeviceGetEnforcedPowerLimit", handle.power_limit_mw)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeDevice) -> object:
        return handle.answer("nvmlDeviceGetPowerManagementDefaultLimit", handle.default_power_limit_mw)

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeDevice, limit_mw: int) -> None:
        handle.power_limit_mw = int(handle.answer("nvmlDeviceSetPowerManagementLimit", limit_mw))

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeDevice, error_type: int, counter: int) -> object:
        return handle.answer("nvmlDeviceGetTotalEccErrors", handle.ecc_uncorrected)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> object:
        # Real NVML cannot tell a MIG-enabled GPU's utilisation either.
        if handle.mig_enabled:
            raise NVMLError_NotSupported()
        return handle.answer("nvmlDeviceGetUtilizationRates", SimpleNamespace(gpu=handle.utilization_pct, memory=0))

    def nvmlDeviceGetMigMode(self, handle: FakeDevice) -> object:
        mode = NVML_DEVICE_MIG_ENABLE if handle.mig_enabled else NVML_DEVICE_MIG_DISABLE
        return handle.answer("nvmlDeviceGetMigMode", [mode, mode])

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeDevice) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeDevice, index: int) -> FakeMig:
        if index >= len(handle.migs):
            raise NVMLError_NotFound()
        return handle.migs[index]

    def nvmlDeviceGetAttributes(self, handle: FakeMig) -> SimpleNamespace:
        return SimpleNamespace(gpuInstanceSliceCount=handle.slices, memorySizeMB=handle.memory_mb)


def from_spec(spec: SimSpec, unit_id: str) -> FakeNvml:
    """A healthy, idle machine as the spec describes; uuids are stable per unit and index."""
    return FakeNvml([_device(spec, unit_id, index) for index in range(spec.count)])


def _device(spec: SimSpec, unit_id: str, index: int) -> FakeDevice:
    migs = [
        FakeMig(
            name=f"{spec.nvml_name} MIG {profile}",
            uuid=f"MIG-{uuid.uuid5(SIMULATED_NAMESPACE, f'{unit_id}/{index}/mig/{i}')}",
            memory_mb=mig_memory_gb(profile) * 1024,
            slices=int(profile[0]),
        )
        for i, profile in enumerate(spec.mig)
    ]
    return FakeDevice(
        name=spec.nvml_name,
        uuid=f"GPU-{uuid.uuid5(SIMULATED_NAMESPACE, f'{unit_id}/{index}')}",
        memory_mb=spec.vram_mb,
        power_limit_mw=DEFAULT_POWER_LIMIT_W.get(spec.model, 300) * 1000,
        migs=migs,
        mig_enabled=bool(migs),
    )
