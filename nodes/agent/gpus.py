"""GPU inventory: simulated from a spec such as `8xH100-80GB`, or discovered through NVML."""

import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

MAX_GPUS = 64
SPEC = re.compile(r"(?P<count>\d+)x(?P<model>[A-Za-z0-9][A-Za-z0-9_.-]*?)-(?P<gb>\d+)GB", re.I)
# Fixed namespace so that a unit's simulated GPUs keep their uuids across restarts.
SIMULATED_NAMESPACE = uuid.UUID("6a1f6a52-8f0e-4d8e-9a57-3c1f9a6b2e10")


class InventoryError(Exception):
    pass


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

    def as_report(self) -> dict[str, Any]:
        return asdict(self)


def parse_spec(spec: str) -> tuple[int, str, int]:
    """`8xH100-80GB` -> (8, "H100", 81920): count, model, VRAM in MiB."""
    match = SPEC.fullmatch(spec.strip())
    if not match:
        raise InventoryError(f"bad simulated inventory {spec!r}: expected COUNTxMODEL-VRAMGB, e.g. 8xH100-80GB")
    count, gb = int(match["count"]), int(match["gb"])
    if not 1 <= count <= MAX_GPUS:
        raise InventoryError(f"bad simulated inventory {spec!r}: count must be 1..{MAX_GPUS}")
    if gb < 1:
        raise InventoryError(f"bad simulated inventory {spec!r}: VRAM must be at least 1 GB")
    return count, match["model"], gb * 1024


def simulate(spec: str, unit_id: str) -> list[Gpu]:
    count, model, vram_mb = parse_spec(spec)
    return [
        Gpu(
            index=i,
            uuid=f"GPU-{uuid.uuid5(SIMULATED_NAMESPACE, f'{unit_id}/{i}')}",
            model=model,
            vram_mb=vram_mb,
            cuda_version="12.4",
        )
        for i in range(count)
    ]


def discover() -> list[Gpu]:
    """Read the real GPUs through NVML (package nvidia-ml-py)."""
    try:
        import pynvml
    except ImportError:
        raise InventoryError(
            "cannot discover GPUs: nvidia-ml-py is not installed "
            "(pip install nvidia-ml-py, or use --simulate 8xH100-80GB)"
        ) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise InventoryError(f"cannot discover GPUs: NVML failed to start ({exc})") from None
    try:
        return [_nvml_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def _nvml_gpu(nvml: Any, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    cuda = nvml.nvmlSystemGetCudaDriverVersion()
    return Gpu(
        index=index,
        uuid=nvml.nvmlDeviceGetUUID(handle),
        model=nvml.nvmlDeviceGetName(handle).removeprefix("NVIDIA ")[:40],
        vram_mb=nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
        driver_version=nvml.nvmlSystemGetDriverVersion(),
        cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
    )
