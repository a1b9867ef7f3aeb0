"""``Idempotency-Key`` on POSTs that create things: a retry gets the first answer back.

The record is inserted first, in the same transaction as whatever the view creates, so the
database's unique constraint decides between two concurrent requests with one key: the second
insert waits for the first transaction, fails once it commits, and replays its stored answer. If the
first rolls back, the second goes ahead. Only successful (2xx) answers are stored; an error leaves
nothing behind, so the client may retry with the same key.
"""

import functools
import hashlib
import json
from datetime import timedelta

from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from marketplace.kernel.models import IdempotencyRecord

HEADER = "Idempotency-Key"
MAX_LENGTH = 255
RETENTION = timedelta(hours=24)


class IdempotencyKeyInvalid(exceptions.APIException):
    status_code = 400
    default_detail = f"{HEADER} must be 1 to {MAX_LENGTH} printable characters."
    default_code = "idempotency_key_invalid"


class IdempotencyKeyReused(exceptions.APIException):
    status_code = 422
    default_detail = f"This {HEADER} was already used with a different request body."
    default_code = "idempotency_key_reused"


def request_hash(data) -> str:
    """The parsed body, canonically encoded, so key order and whitespace do not matter."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), cls=DjangoJSONEncoder)
    return hashlib.sha256(canonical.encode()).hexdigest()


def replay(record: IdempotencyRecord) -> Response:
    return Response(record.response_body, status=record.response_status, headers={"Idempotent-Replayed": "true"})


def idempotent(handler):
    """Decorate a view's POST handler (``create`` or ``post``) to honour ``Idempotency-Key``."""

    @functools.wraps(handler)
    def wrapper(view, request, *args, **kwargs):
        key = request.headers.get(HEADER)
        if key is None:
            return handler(view, request, *args, **kwargs)
        if not key or len(key) > MAX_LENGTH or not key.isprintable():
            raise IdempotencyKeyInvalid()
        endpoint = f"{request.method} {request.path.rstrip('/')}"
        digest = request_hash(request.data)
        with transaction.atomic():
            try:
                with transaction.atomic():
                    record = IdempotencyRecord.objects.create(
                        user=request.user,
                        key=key,
                        endpoint=endpoint,
                        request_hash=digest,
                        response_status=0,
                        response_body={},
                    )
            except IntegrityError:
                record = IdempotencyRecord.objects.get(user=request.user, key=key, endpoint=endpoint)
                if record.request_hash != digest:
                    raise IdempotencyKeyReused() from None
                return replay(record)
            response = handler(view, request, *args, **kwargs)
            if not 200 <= response.status_code < 300:
                transaction.set_rollback(True)
                return response
            record.response_status = response.status_code
            record.response_body = json.loads(JSONRenderer().render(response.data) or b"null")
            record.save(update_fields=["response_status", "response_body"])
        return response

    return extend_schema(
        parameters=[
            OpenApiParameter(
                HEADER,
                str,
                OpenApiParameter.HEADER,
                description=f"Makes a retry safe: the same key and body within {RETENTION} replay the "
                "first answer (with Idempotent-Replayed: true); the same key with another body is a 422.",
            )
        ],
    )(wrapper)


def idempotency_records_prune(*, now=None) -> int:
    """Delete records older than the retention; returns how many went."""
    cutoff = (now or timezone.now()) - RETENTION
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=cutoff).delete()
    return deleted
