"""DRF throttles counted in the shared cache (``marketplace.kernel.ratelimit``): a request over
the limit is a 429 problem with Retry-After, and the limit holds across web processes."""

from django.conf import settings
from rest_framework import throttling

from marketplace.kernel.ratelimit import Limiter


class SharedRateThrottle(throttling.BaseThrottle):
    """Subclasses name a ``scope``, the ``setting`` holding its rate, and who is counted."""

    scope = ""
    setting = ""

    def ident(self, request, view) -> str | None:
        """Whom this request counts against; None leaves it uncounted by this throttle."""
        raise NotImplementedError

    def allow_request(self, request, view) -> bool:
        self._wait = 0.0
        ident = self.ident(request, view)
        if ident is None:
            return True
        self._wait = Limiter(self.scope, getattr(settings, self.setting)).hit(ident)
        return not self._wait

    def wait(self) -> float | None:
        return self._wait or None
