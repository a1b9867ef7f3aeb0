"""Every API error is an RFC 9457 problem document: type, title, status, detail, errors."""

from http import HTTPStatus

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler

from marketplace.kernel.errors import DomainError

PROBLEM_CONTENT_TYPE = "application/problem+json"


def _title(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"


def problem(status_code: int, code: str, detail: str, *, title: str = "", errors=None) -> dict:
    body = {
        "type": f"/problems/{code}",
        "title": title or _title(status_code),
        "status": status_code,
        "detail": detail,
    }
    if errors:
        body["errors"] = errors
    return body


def _flatten(messages):
    """DRF error details as plain strings, keeping the field structure."""
    if isinstance(messages, dict):
        return {field: _flatten(value) for field, value in messages.items()}
    if isinstance(messages, list):
        if all(not isinstance(m, (dict, list)) for m in messages):
            return [str(m) for m in messages]
        return [_flatten(m) for m in messages]
    return [str(messages)]


def problem_exception_handler(exc, context):
    if isinstance(exc, DomainError):
        body = problem(exc.status, exc.code, exc.detail, title=exc.title)
        return Response(body, status=exc.status, content_type=PROBLEM_CONTENT_TYPE)
    if isinstance(exc, RequestDataTooBig):  # Django's own limit, met when something reads request.body
        body = problem(413, "payload-too-large", too_large_detail())
        return Response(body, status=413, content_type=PROBLEM_CONTENT_TYPE)
    response = exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        errors = _flatten(exc.detail)
        if not isinstance(errors, dict):
            errors = {"non_field_errors": errors}
        body = problem(
            response.status_code,
            "validation-error",
            "The request has invalid fields; see errors.",
            title="Invalid request",
            errors=errors,
        )
    else:
        detail = exc.detail if isinstance(exc, exceptions.APIException) else exc
        code = str(getattr(detail, "code", None) or "error").replace("_", "-")
        body = problem(response.status_code, code, str(detail))
    response.data = body
    response.content_type = PROBLEM_CONTENT_TYPE
    return response


def too_large_detail() -> str:
    return f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."


def problem_response(status_code: int, code: str, detail: str) -> JsonResponse:
    return JsonResponse(problem(status_code, code, detail), status=status_code, content_type=PROBLEM_CONTENT_TYPE)
