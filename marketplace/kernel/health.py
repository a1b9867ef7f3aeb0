"""Liveness of a web process: it answers, with nothing behind it (no database, no cache), so a
probe tells "this process is serving" apart from "a part behind it is down"."""

from django.http import HttpResponse
from django.views.decorators.cache import never_cache


@never_cache
def healthz(request) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain")
