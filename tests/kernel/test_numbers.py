"""Numbers from requests are checked for text, exponent and range before any arithmetic."""

import time
from decimal import Decimal

import pytest

from marketplace.kernel.numbers import MAX_TEXT, NumberError, decimal_parse, int_parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2.5", Decimal("2.5")), ("  7 ", Decimal(7)), ("1e3", Decimal(1000)), (".5", Decimal("0.5")),
     ("0.1234567", Decimal("0.123456")), ("-0", Decimal(0))],
)  # fmt: skip
def test_a_number_in_range_is_parsed_and_rounded_down_to_its_places(text, expected):
    assert decimal_parse(text, minimum=0, maximum=10_000, places=6) == expected


@pytest.mark.parametrize(
    "text",
    ["1e999999", "1e999990", "-1e999999", "1e-999999", "9" * (MAX_TEXT + 1), "NaN", "Infinity", "-inf", "sNaN",
     "1_000", "0x10", "", " ", "1e", "1.2.3", "１２", "10001", "-0.5", "1e31", "1e5", "\x00"],
)  # fmt: skip
def test_anything_else_is_a_number_error_and_costs_nothing(text):
    started = time.process_time()
    with pytest.raises(NumberError):
        decimal_parse(text, minimum=0, maximum=10_000, places=6)
    assert time.process_time() - started < 0.05  # CPU time: no million-digit number was built


@pytest.mark.parametrize("text", ["1.0", "1e2", "9" * 19, "+", "-", "2 3", "99999999999999999999", "-1", "101"])
def test_a_whole_number_has_digits_only_and_stays_in_range(text):
    with pytest.raises(NumberError):
        int_parse(text, minimum=0, maximum=100)
    assert int_parse(" 42", minimum=0, maximum=100) == 42
    assert int_parse("-3", minimum=-5, maximum=0) == -3
