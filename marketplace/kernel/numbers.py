"""Numbers from requests, parsed within bounds before any arithmetic.

``Decimal("1e999999")`` costs nothing to build, but multiplying it, turning it into an ``int`` or
quantizing it builds a number with a million digits: one request can hold a worker for seconds.
So a number from outside is checked, in this order, for its text (plain digits, at most
``MAX_TEXT`` characters: no NaN, infinity or underscores), its exponent and its range, and only
then converted. Every query parameter and every hand-parsed body number goes through here; DRF
fields get the same guarantee from their ``max_digits`` / ``min_value`` / ``max_value``.
"""

import re
from decimal import ROUND_DOWN, Decimal

MAX_TEXT = 40
# The exponent as written, before the digits move it: enough for any number a client means.
MAX_EXPONENT = 30
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,6})?", re.ASCII)
_INTEGER = re.compile(r"[+-]?\d{1,18}", re.ASCII)


class NumberError(ValueError):
    """The text is not a number in range; the message says what is accepted."""


def _text(text: str, pattern: re.Pattern, what: str) -> str:
    text = text.strip()
    if len(text) > MAX_TEXT or not pattern.fullmatch(text):
        raise NumberError(f"'{text[:MAX_TEXT]}' is not {what}")
    return text


def decimal_parse(text: str, *, minimum: Decimal | int, maximum: Decimal | int, places: int = 6) -> Decimal:
    """``text`` as a Decimal from ``minimum`` to ``maximum``, rounded down to ``places`` decimals."""
    value = Decimal(_text(text, _NUMBER, "a number"))
    if abs(value.as_tuple().exponent) > MAX_EXPONENT or not minimum <= value <= maximum:
        # Decimal compares by adjusted exponent first, so the range check costs nothing either.
        raise NumberError(f"'{text.strip()}' is out of range: a number from {minimum} to {maximum}")
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN)


def int_parse(text: str, *, minimum: int, maximum: int) -> int:
    """``text`` as a whole number from ``minimum`` to ``maximum`` (digits only, no exponent)."""
    value = int(_text(text, _INTEGER, "a whole number"))
    if not minimum <= value <= maximum:
        raise NumberError(f"'{text.strip()}' is out of range: a whole number from {minimum} to {maximum}")
    return value
