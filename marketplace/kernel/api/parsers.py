"""The API's JSON parser: bounded size, bounded depth, and text PostgreSQL can store.

A body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` bytes is a 413 (read no further than that), JSON nested
deeper than ``MAX_DEPTH`` a 400 (a thousand levels would exhaust Python's recursion), and a NUL or
an unpaired surrogate anywhere in the document, keys included, a 400: nothing that reaches a
serializer, a query or a page can hold them."""

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework import exceptions, parsers
from rest_framework.utils import json

MAX_DEPTH = 32  # the deepest request (a heartbeat's MIG instances) is six levels


def _bad_text(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode()
    except UnicodeEncodeError:  # an unpaired surrogate, written as \ud800 in the JSON
        return True
    return False


def document_check(document) -> None:
    """Raise ParseError if ``document`` is deeper than MAX_DEPTH or holds text PostgreSQL refuses.
    Iterative, so the check itself cannot run out of stack."""
    pending = [(document, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                raise exceptions.ParseError(f"JSON is nested deeper than {MAX_DEPTH} levels.")
            children = node.items() if isinstance(node, dict) else ((None, child) for child in node)
            for key, child in children:
                if key is not None and _bad_text(key):
                    raise exceptions.ParseError("JSON text holds a NUL or an unpaired surrogate.")
                pending.append((child, depth + 1))
        elif isinstance(node, str) and _bad_text(node):
            raise exceptions.ParseError("JSON text holds a NUL or an unpaired surrogate.")


class BoundedJSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise RequestDataTooBig(f"The body is over {limit} bytes.")  # a 413 problem (kernel.api.errors)
        try:
            document = json.loads(raw.decode(), parse_constant=json.strict_constant if self.strict else None)
        except RecursionError:
            raise exceptions.ParseError(f"JSON is nested deeper than {MAX_DEPTH} levels.") from None
        except ValueError as error:  # UnicodeDecodeError included
            raise exceptions.ParseError(f"JSON parse error - {error}") from None
        document_check(document)
        return document
