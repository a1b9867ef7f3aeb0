"""The CSV renderer's cells: text that starts like a formula is shown as text; numbers stay numbers."""

import pytest

from marketplace.kernel.api.renderers import CsvRenderer, spreadsheet_safe


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("=HYPERLINK(1)", "'=HYPERLINK(1)"),
        ("+cmd", "'+cmd"),
        ("-rm", "'-rm"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\\tx", "\\tx"),
        ("\tx", "'\tx"),
        ("-1.500000", "-1.500000"),
        ("+2", "+2"),
        ("garden", "garden"),
        ("", ""),
        (-3, -3),
        (None, None),
    ],
)
def test_a_cell_is_spreadsheet_safe(value, shown):
    assert spreadsheet_safe(value) == shown


def test_the_renderer_makes_every_cell_safe():
    rendered = CsvRenderer().render([{"name": "=1+1", "amount": "-2.000000", "policy": {"unit": "@me"}}])
    assert rendered.decode() == "name,amount,policy.unit\n'=1+1,-2.000000,'@me\n"
