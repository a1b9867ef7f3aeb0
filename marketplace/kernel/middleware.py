"""The project's own middleware: the request's id and metrics, request bounds (text PostgreSQL
can store, the body's declared size) and static files in an asynchronous chain.

A NUL or invalid UTF-8 in the path or the query string is a 400 problem before any view sees it
(PostgreSQL refuses NUL in text, so a view that passed it to a query would answer 500)."""

import functools
import re
import time
import uuid
from urllib.parse import parse_qsl, unquote_to_bytes

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.utils.deprecation import MiddlewareMixin
from whitenoise.middleware import WhiteNoiseMiddleware

from marketplace.kernel import metrics
from marketplace.kernel.api.errors import problem_response, too_large_detail
from marketplace.kernel.logcontext import log_bind, log_reset

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAMED_GROUP = re.compile(r"\(\?P<(\w+)>(?:[^()]|\([^()]*\))*\)")


def _raw_path(request) -> bytes:
    scope = getattr(request, "scope", None)  # ASGI: the path as the client sent it
    if scope is not None and scope.get("raw_path") is not None:
        return unquote_to_bytes(scope["raw_path"])
    # WSGI: Django percent-encodes again the bytes of the path that are not UTF-8.
    return unquote_to_bytes(request.path_info)


def text_problem(request) -> str | None:
    """What is wrong with the request's path or query string, or None."""
    try:
        path = _raw_path(request).decode()
        fields = parse_qsl(
            request.META.get("QUERY_STRING", ""),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=settings.DATA_UPLOAD_MAX_NUMBER_FIELDS,
        )
    except UnicodeDecodeError:
        return "The path or the query string is not valid UTF-8."
    except ValueError:  # more fields than DATA_UPLOAD_MAX_NUMBER_FIELDS
        return "The query string has too many parameters."
    if "\x00" in path or any("\x00" in key or "\x00" in value for key, value in fields):
        return "The path or the query string holds a NUL character."
    return None


def _declared_too_large(request) -> bool:
    declared = request.META.get("CONTENT_LENGTH") or ""
    return declared.isdigit() and (len(declared) > 15 or int(declared) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE)


class RequestBoundsMiddleware(MiddlewareMixin):
    """Text a database can store, and a body no larger than DATA_UPLOAD_MAX_MEMORY_SIZE as declared
    (under ASGI the application's outer layer has refused a larger one already)."""

    def process_request(self, request):
        if _declared_too_large(request):
            return problem_response(413, "payload-too-large", too_large_detail())
        problem = text_problem(request)
        return None if problem is None else problem_response(400, "invalid-text", problem)


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, able to sit in an asynchronous middleware chain. A synchronous-only middleware
    makes Django call everything after it from a thread, so an asynchronous view's idle wait (a
    long poll) would hold that thread for as long as it waits."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response=None, settings=settings):
        super().__init__(get_response, settings)
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        return self.__acall__(request) if self.is_async else super().__call__(request)

    async def __acall__(self, request):
        found = self.find_file(request.path_info) if self.autorefresh else self.files.get(request.path_info)
        if found is not None:
            return self.serve(found, request)
        return await self.get_response(request)


@functools.lru_cache(maxsize=1024)
def route_label(route: str) -> str:
    """A URL pattern as a metric label: ``api/v1/jobs/(?P<pk>[0-9a-f-]{36})/?$`` reads
    ``api/v1/jobs/<pk>``, as a path() pattern would."""
    route = _NAMED_GROUP.sub(r"<\1>", route)
    return route.replace("^", "").removesuffix("$").removesuffix("/?")


class ObservedRequestMiddleware:
    """Each request gets an id (the client's ``X-Request-ID`` if it is a short token, else a new
    one), bound to its log lines and echoed in the answer; and each answer is counted and timed
    in ``/metrics`` by its route pattern (never the raw path: ids would make the labels endless)."""

    sync_capable = async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        began, token = self._begin(request)
        try:
            response = self.get_response(request)
        finally:
            log_reset(token)
        return self._end(request, response, began)

    async def _acall(self, request):
        began, token = self._begin(request)
        try:
            response = await self.get_response(request)
        finally:
            log_reset(token)
        return self._end(request, response, began)

    @staticmethod
    def _begin(request):
        given = request.headers.get("x-request-id", "")
        request.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        return time.perf_counter(), log_bind(request_id=request.request_id)

    @staticmethod
    def _end(request, response, began: float):
        match = getattr(request, "resolver_match", None)
        route = route_label(match.route) if match is not None else "unmatched"
        seconds = time.perf_counter() - began
        metrics.HTTP_REQUESTS.labels(request.method, route, f"{response.status_code // 100}xx").inc()
        metrics.HTTP_LATENCY.labels(request.method, route).observe(seconds)
        response.setdefault("X-Request-ID", request.request_id)
        return response
