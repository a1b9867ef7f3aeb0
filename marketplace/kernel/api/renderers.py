import csv
import io
import json
from decimal import Decimal, InvalidOperation

from rest_framework.exceptions import ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer


def _flatten(record: dict, prefix: str = "") -> dict:
    """Nested objects become dotted columns (policy.jurisdiction.matched); lists stay JSON."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


# A cell starting with one of these is run as a formula by spreadsheets (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A cell a spreadsheet shows as the text it is: text that starts like a formula gets a
    leading apostrophe. Numbers, and text that reads as one (a negative amount), stay as they are."""
    if not isinstance(value, str) or value[:1] not in FORMULA_START:
        return value
    try:
        Decimal(value)
    except InvalidOperation:
        return f"'{value}"
    return value


class CsvRenderer(BaseRenderer):
    """A list of records as CSV, one row each, for ``?format=csv`` or ``Accept: text/csv``.

    An error is not a list: it is rendered as the JSON problem document it already is. Names
    people chose (jobs, units) are made spreadsheet-safe.
    """

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if not isinstance(data, list):
            return JSONRenderer().render(data, accepted_media_type, renderer_context)
        rows = [{k: spreadsheet_safe(v) for k, v in _flatten(record).items()} for record in data]
        columns = list(dict.fromkeys(column for row in rows for column in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode(self.charset)


class FormatNegotiation(DefaultContentNegotiation):
    """An unknown ``?format=`` is a 400 naming the parameter and the formats on offer, not DRF's
    bare 404 (the resource exists; the request asked for it in a form it does not come in)."""

    def filter_renderers(self, renderers, format):
        found = [renderer for renderer in renderers if renderer.format == format]
        if not found:
            offered = ", ".join(renderer.format for renderer in renderers)
            raise ValidationError({"format": [f"Unknown format {format!r}; one of {offered}."]})
        return found
