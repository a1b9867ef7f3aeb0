"""Money is held as integer micro-units of the currency (1 USD = 1,000,000 micros)."""

from decimal import ROUND_DOWN, Decimal

MICROS = Decimal(1_000_000)


def to_micros(amount: Decimal) -> int:
    return int((Decimal(amount) * MICROS).to_integral_value(rounding=ROUND_DOWN))


def from_micros(micros: int) -> Decimal:
    return (Decimal(micros) / MICROS).quantize(Decimal("0.000001"))
