"""Money is held as integer micro-units of the currency (1 USD = 1,000,000 micros)."""

from decimal import ROUND_DOWN, Decimal

MICROS = Decimal(1_000_000)


def to_micros(amount: Decimal) -> int:
    return int((Decimal(amount) * MICROS).to_integral_value(rounding=ROUND_DOWN))


def from_micros(micros: int) -> Decimal:
    return (Decimal(micros) / MICROS).quantize(Decimal("0.000001"))


MS_PER_HOUR = 3_600_000


def usage_cost_micros(*, gpu_ms: int, price_per_gpu_hour_micros: int) -> int:
    """Cost of GPU time at a price per GPU-hour, rounded down to a whole micro-unit."""
    return gpu_ms * price_per_gpu_hour_micros // MS_PER_HOUR


def run_cost_micros(*, price_per_gpu_hour_micros: int, gpus: int, seconds: int) -> int:
    """What `seconds` of a job on `gpus` GPUs costs at a price per GPU-hour, rounded up."""
    return -(-price_per_gpu_hour_micros * gpus * seconds * 1000 // MS_PER_HOUR)
