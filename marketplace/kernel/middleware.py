"""The project's own middleware: request bounds (text PostgreSQL can store, the body's declared
size) and static files in an asynchronous chain.

A NUL or invalid UTF-8 in the path or the query string is a 400 problem before any view sees it
(PostgreSQL refuses NUL in text, so a view that passed it to a query would answer 500)."""

from urllib.parse import parse_qsl, unquote_to_bytes

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.utils.deprecation import MiddlewareMixin
from whitenoise.middleware import WhiteNoiseMiddleware

from marketplace.kernel.api.errors import problem_response, too_large_detail


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
