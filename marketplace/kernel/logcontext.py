"""Ids a log line carries as fields: the request, and the job, allocation, unit and renter it
concerns. Code binds what it knows for a block (``with log_context(job=...)``) or for the rest of
a request or task (``log_bind``); ``ContextFilter`` copies the bound ids onto every record, so the
JSON formatter in production writes them as fields without each call site naming them.

Context variables: each thread, asyncio task and Celery task sees its own."""

import contextlib
import contextvars
import logging
from collections.abc import Iterator

FIELDS = ("request_id", "job", "allocation", "unit", "renter", "task")

_bound: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("shedshare_log_context", default={})  # noqa: B039 - never mutated, only replaced


def log_bind(**ids) -> contextvars.Token:
    """Bind ids until the returned token is reset (``log_reset``); ``None`` values are left out."""
    unknown = set(ids) - set(FIELDS)
    if unknown:
        raise ValueError(f"not a log context field: {', '.join(sorted(unknown))}")
    return _bound.set({**_bound.get(), **{key: str(value) for key, value in ids.items() if value is not None}})


def log_reset(token: contextvars.Token) -> None:
    _bound.reset(token)


@contextlib.contextmanager
def log_context(**ids) -> Iterator[None]:
    token = log_bind(**ids)
    try:
        yield
    finally:
        log_reset(token)


def log_fields() -> dict[str, str]:
    return dict(_bound.get())


class ContextFilter(logging.Filter):
    """Adds the bound ids to each record (as attributes, which the JSON formatter writes as fields
    and the plain formatter leaves out); a field the call site passed in ``extra`` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _bound.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True
