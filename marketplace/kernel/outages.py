"""Outages answer 503, never 500: when the database, the broker or the cache cannot be reached,
a request is told to come back (``Retry-After``) as a problem+json on the API and as a short page
on the portal. The page is plain HTML with no template, session or user behind it: those need
the database that is down.

Two places apply it: ``OutageMiddleware`` for an error raised by a view (also with DEBUG on, where
Django would show its debug page), and the project's ``handler500`` for one raised in another
middleware (a session read from the database, say)."""

import redis.exceptions
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.utils.deprecation import MiddlewareMixin
from kombu.exceptions import OperationalError as BrokerError

from marketplace.kernel.api.errors import problem_response

OUTAGE_ERRORS = (OperationalError, InterfaceError, BrokerError, redis.exceptions.ConnectionError, ConnectionError)

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Shedshare is briefly unavailable</title></head>
<body><h1>Shedshare is briefly unavailable</h1>
<p>A part of the service cannot be reached just now. Nothing you did was lost; please try again in a
few seconds.</p></body></html>"""


def is_outage(exc: BaseException | None) -> bool:
    return isinstance(exc, OUTAGE_ERRORS)


def outage_response(request) -> HttpResponse:
    if request.path.startswith("/api/"):
        response = problem_response(
            503, "service-unavailable", "A part of the service cannot be reached just now; try again after Retry-After."
        )
    else:
        response = HttpResponse(PAGE, status=503)
    response["Retry-After"] = str(settings.OUTAGE_RETRY_AFTER_S)
    return response


class OutageMiddleware(MiddlewareMixin):
    def process_exception(self, request, exception):
        if is_outage(exception):
            return outage_response(request)
        return None
