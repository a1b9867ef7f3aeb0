"""Simulated inventory specs: `8xH100-80GB`, `4xB200`, `2xH100-80GB:mig=3g.40gb+3g.40gb`, `…:mig=1g.10gb*7`."""

import math
import re
from dataclasses import dataclass

MAX_GPUS = 64
MIG_SLICES = 7
SPEC = re.compile(
    r"(?P<count>\d+)x(?P<model>[A-Za-z0-9][A-Za-z0-9_.-]*?)(?:-(?P<gb>\d+)GB)?(?::mig=(?P<mig>\S*))?",
    re.I,
)
MIG_TERM = re.compile(r"(?P<profile>(?P<slices>[1-7])g\.(?P<gb>\d+)gb)(?:\*(?P<times>\d+))?", re.I)
# Total memory in MiB as NVML reports it for the usual boards, which is a little under the marketing size.
DEFAULT_VRAM_MB = {"H100": 81559, "H200": 143771, "B200": 183359, "A100": 81920, "L40S": 46068}
# The names NVML gives these boards, so that simulated names go through the same normalisation as real ones.
NVML_NAMES = {
    "H100": "NVIDIA H100 80GB HBM3",
    "H200": "NVIDIA H200",
    "B200": "NVIDIA B200",
    "A100": "NVIDIA A100-SXM4-80GB",
    "L40S": "NVIDIA L40S",
}


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class SimSpec:
    count: int
    model: str
    vram_mb: int
    mig: tuple[str, ...] = ()  # MIG profiles on every GPU, e.g. ("3g.40gb", "3g.40gb"); empty: MIG off

    @property
    def nvml_name(self) -> str:
        return NVML_NAMES.get(self.model, f"NVIDIA {self.model}")


def parse_spec(spec: str) -> SimSpec:
    match = SPEC.fullmatch(spec.strip())
    if not match:
        raise _bad(spec, "expected COUNTxMODEL[-VRAMGB][:mig=LAYOUT], e.g. 8xH100-80GB")
    count = int(match["count"])
    if not 1 <= count <= MAX_GPUS:
        raise _bad(spec, f"count must be 1..{MAX_GPUS}")
    model = match["model"].upper() if match["model"].upper() in DEFAULT_VRAM_MB else match["model"]
    vram_mb = _vram_mb(spec, model, match["gb"])
    mig = _mig_layout(spec, match["mig"], vram_mb) if match["mig"] is not None else ()
    return SimSpec(count=count, model=model, vram_mb=vram_mb, mig=mig)


def _vram_mb(spec: str, model: str, gb: str | None) -> int:
    if gb is None:
        if model not in DEFAULT_VRAM_MB:
            known = ", ".join(DEFAULT_VRAM_MB)
            raise _bad(spec, f"give {model}'s VRAM, e.g. 2x{model}-24GB (known models: {known})")
        return DEFAULT_VRAM_MB[model]
    if int(gb) < 1:
        raise _bad(spec, "VRAM must be at least 1 GB")
    return int(gb) * 1024


def _mig_layout(spec: str, layout: str, vram_mb: int) -> tuple[str, ...]:
    profiles: list[str] = []
    for term in layout.split("+"):
        match = MIG_TERM.fullmatch(term)
        if not match:
            raise _bad(spec, f"MIG term {term!r} is not PROFILE or PROFILE*N, e.g. 3g.40gb or 1g.10gb*7")
        profiles += [match["profile"].lower()] * int(match["times"] or 1)
    slices = sum(int(profile[0]) for profile in profiles)
    if not profiles or slices > MIG_SLICES:
        raise _bad(spec, f"the MIG layout uses {slices} compute slices, a GPU has 1..{MIG_SLICES}")
    # Profile names round memory to whole GB, so compare against the board's size rounded up too.
    if sum(mig_memory_gb(profile) for profile in profiles) > math.ceil(vram_mb / 1024):
        raise _bad(spec, f"the MIG instances need more memory than the GPU's {vram_mb} MiB")
    return tuple(profiles)


def _bad(spec: str, why: str) -> SpecError:
    return SpecError(f"bad simulated inventory {spec!r}: {why}")


def mig_memory_gb(profile: str) -> int:
    """`3g.40gb` -> 40."""
    return int(profile.split(".")[1].removesuffix("gb"))
