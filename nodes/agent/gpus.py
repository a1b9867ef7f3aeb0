"""GPU inventory, read through NVML: the real one (pynvml) or a simulated one (fake_nvml) alike."""

import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from nodes.agent import fake_nvml
from nodes.agent.simspec import SpecError, parse_spec

# Used when a board does not tell its slowdown temperature; data-centre GPUs throttle around here.
CRITICAL_TEMP_C = 90
VENDOR_WORDS = {"NVIDIA", "Tesla", "GeForce", "Quadro", "Generation"}
DATACENTER_MODEL = re.compile(r"[A-Z]{1,2}\d{1,3}[A-Z]?")
MIG_PROFILE = re.compile(r"(\d+c\.)?\d+g\.\d+gb(\+me)?")


class InventoryError(Exception):
    pass


@dataclass(frozen=True)
class MigInstance:
    uuid: str
    profile: str  # e.g. "3g.40gb"
    memory_mb: int


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    model: str
    vram_mb: int
    driver_version: str = ""
    cuda_version: str = ""
    mig_mode: bool = False
    healthy: bool = True
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    ecc_errors: int | None = None  # volatile uncorrected; None where the board has no ECC
    utilization_pct: int | None = None
    mig_instances: tuple[MigInstance, ...] = ()
    problems: tuple[str, ...] = ()  # why it is unhealthy

    def as_report(self) -> dict[str, Any]:
        report = asdict(self)
        report["mig_instances"] = [asdict(mig) for mig in self.mig_instances]
        report["problems"] = list(self.problems)
        return report


class Inventory:
    """The unit's GPUs behind one NVML (real or fake): fresh readings, and the one setting the
    agent changes, the power limit during quiet hours."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self.power_cap_w: int | None = None

    def read(self) -> list[Gpu]:
        return read_gpus(self._nvml)

    def cap_power(self, watts: int | None) -> list[str]:
        """Cap every GPU at `watts` (None: back to its default limit); returns what failed."""
        if watts == self.power_cap_w:
            return []
        nvml, failed = self._nvml, []
        try:
            nvml.nvmlInit()
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                try:
                    target = nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) if watts is None else watts * 1000
                    nvml.nvmlDeviceSetPowerManagementLimit(handle, target)
                except nvml.NVMLError as exc:  # e.g. not root, or below the board's minimum
                    failed.append(f"GPU {index}: cannot set the power limit ({exc})")
        except nvml.NVMLError as exc:
            failed.append(f"cannot set power limits: {exc}")
        finally:
            _shutdown(nvml)
        if not failed:
            self.power_cap_w = watts
        return failed


def _shutdown(nvml: Any) -> None:
    with contextlib.suppress(nvml.NVMLError):  # it never started
        nvml.nvmlShutdown()


def simulated_inventory(spec: str, unit_id: str) -> Inventory:
    try:
        parsed = parse_spec(spec)
    except SpecError as exc:
        raise InventoryError(str(exc)) from None
    return Inventory(fake_nvml.from_spec(parsed, unit_id))


def nvml_inventory() -> Inventory:
    """The real GPUs through NVML (package nvidia-ml-py)."""
    try:
        import pynvml
    except ImportError:
        raise InventoryError(
            "cannot discover GPUs: nvidia-ml-py is not installed "
            "(pip install nvidia-ml-py, or use --simulate 8xH100-80GB)"
        ) from None
    return Inventory(pynvml)


def simulate(spec: str, unit_id: str) -> list[Gpu]:
    return simulated_inventory(spec, unit_id).read()


def discover() -> list[Gpu]:
    return nvml_inventory().read()


def read_gpus(nvml: Any) -> list[Gpu]:
    """Every GPU that `nvml` (the pynvml module or a FakeNvml) can see."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise InventoryError(f"cannot discover GPUs: NVML failed to start ({exc})") from None
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        return [_read_gpu(nvml, index, driver, cuda_version) for index in range(nvml.nvmlDeviceGetCount())]
    except nvml.NVMLError as exc:
        raise InventoryError(f"cannot discover GPUs: {exc}") from None
    finally:
        nvml.nvmlShutdown()


def _read_gpu(nvml: Any, index: int, driver: str, cuda_version: str) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    ask = _Asker(nvml, handle)
    telemetry = _telemetry(nvml, ask)
    mig = _mig(nvml, ask)
    return Gpu(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        model=normalise_model(_text(nvml.nvmlDeviceGetName(handle))),
        vram_mb=nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
        driver_version=driver,
        cuda_version=cuda_version,
        **telemetry,
        **mig,
        **_health(nvml, ask, telemetry),
    )


class _Asker:
    """Asks NVML one thing about a device: NotSupported means the board lacks it, any other error is a problem."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self._nvml, self._handle = nvml, handle
        self.problems: list[str] = []

    def __call__(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(self._handle, *args)
        except self._nvml.NVMLError_NotSupported:
            return None
        except self._nvml.NVMLError as exc:
            self.problems.append(f"NVML cannot read {what}: {exc}")
            return None


def _telemetry(nvml: Any, ask: _Asker) -> dict[str, Any]:
    ecc_kind = (nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
    utilization = ask("utilisation", nvml.nvmlDeviceGetUtilizationRates)
    return {
        "temperature_c": ask("temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
        "power_w": _watts(ask("power draw", nvml.nvmlDeviceGetPowerUsage)),
        "power_limit_w": _watts(ask("power limit", nvml.nvmlDeviceGetEnforcedPowerLimit)),
        "ecc_errors": ask("ECC errors", nvml.nvmlDeviceGetTotalEccErrors, *ecc_kind),
        "utilization_pct": None if utilization is None else utilization.gpu,
    }


def _mig(nvml: Any, ask: _Asker) -> dict[str, Any]:
    mode = ask("MIG mode", nvml.nvmlDeviceGetMigMode)  # [current, pending]
    if mode is None or mode[0] != nvml.NVML_DEVICE_MIG_ENABLE:
        return {"mig_mode": False}
    return {"mig_mode": True, "mig_instances": ask("MIG instances", partial(_mig_instances, nvml)) or ()}


def _health(nvml: Any, ask: _Asker, telemetry: dict[str, Any]) -> dict[str, Any]:
    """Healthy: NVML answered, no uncorrected ECC errors, cooler than the board's slowdown temperature."""
    slowdown = nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
    critical_c = ask("slowdown temperature", nvml.nvmlDeviceGetTemperatureThreshold, slowdown) or CRITICAL_TEMP_C
    problems = list(ask.problems)
    if telemetry["ecc_errors"]:
        problems.append(f"{telemetry['ecc_errors']} uncorrected ECC errors")
    temperature = telemetry["temperature_c"]
    if temperature is not None and temperature >= critical_c:
        problems.append(f"{temperature} C, at or above {critical_c} C")
    return {"healthy": not problems, "problems": tuple(problems)}


def _mig_instances(nvml: Any, handle: Any) -> tuple[MigInstance, ...]:
    instances = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError_NotFound:
            continue  # an empty slot
        attributes = nvml.nvmlDeviceGetAttributes(mig)
        instances.append(
            MigInstance(
                uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                profile=_mig_profile(_text(nvml.nvmlDeviceGetName(mig)), attributes),
                memory_mb=int(attributes.memorySizeMB),
            )
        )
    return tuple(instances)


def _mig_profile(name: str, attributes: Any) -> str:
    """NVML names a MIG device "<board> MIG 3g.40gb"; otherwise rebuild the profile from its size."""
    match = MIG_PROFILE.search(name)
    if match:
        return match[0]
    return f"{attributes.gpuInstanceSliceCount}g.{math.ceil(attributes.memorySizeMB / 1024)}gb"


def normalise_model(name: str) -> str:
    """The short name we advertise: "NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA GeForce RTX 4090" -> "RTX-4090"."""
    words = [word for word in re.split(r"[\s-]+", name.strip()) if word and word not in VENDOR_WORDS]
    if words and DATACENTER_MODEL.fullmatch(words[0]):
        return words[0]
    return "-".join(words)[:40] or "unknown"


def _watts(milliwatts: int | None) -> float | None:
    return None if milliwatts is None else round(milliwatts / 1000, 1)


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else value
