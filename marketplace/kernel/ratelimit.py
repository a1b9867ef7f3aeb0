"""Limits counted in the shared cache (Redis when configured), so every web process counts
against the same budget.

A limit is "<count>/<sec|min|hour|day>" over a sliding window, approximated from two fixed
windows as Cloudflare and nginx do: the previous window's count, weighted by how much of it still
overlaps the sliding one, plus the current window's. Counters are atomic increments, so requests
spread over processes cannot both read "one left" and both pass.
"""

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.core.cache import cache

log = logging.getLogger(__name__)

PERIODS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


@dataclass(frozen=True)
class Rate:
    count: int
    period_s: int

    @classmethod
    def parse(cls, text: str) -> "Rate":
        count, _, period = text.partition("/")
        try:
            rate = cls(int(count), PERIODS[period.strip().lower()])
        except (KeyError, ValueError):
            rate = None
        if rate is None or rate.count < 1:
            raise ValueError(f"{text!r} is not a rate such as 120/min.")
        return rate


class Limiter:
    """One kind of limit (``name``), counted per caller (``ident``: a key, a unit, an address)."""

    def __init__(self, name: str, rate: str, *, clock: Callable[[], float] = time.time) -> None:
        self.name, self.rate, self._clock = name, Rate.parse(rate), clock

    def _keys(self, ident: str, window: int) -> tuple[str, str]:
        # Idents can be e-mail addresses or anything a caller sent: hashed, they make valid keys.
        digest = hashlib.sha256(ident.encode()).hexdigest()[:32]
        return f"rl:{self.name}:{digest}:{window - 1}", f"rl:{self.name}:{digest}:{window}"

    def _position(self) -> tuple[int, float]:
        now = self._clock()
        window = int(now // self.rate.period_s)
        return window, (now - window * self.rate.period_s) / self.rate.period_s

    def _wait_s(self, previous: int, current: int, elapsed: float) -> float:
        """Seconds until one more request fits: 0 when it fits now."""
        limit, period = self.rate.count, self.rate.period_s
        if previous * (1 - elapsed) + current + 1 <= limit:
            return 0.0
        if current + 1 <= limit:  # this window's requests fit; wait for the previous one to fade
            return max(period * (1 - (limit - current - 1) / previous - elapsed), 1.0)
        # The next window opens with this one weighing fully, fading as it goes.
        return max(period * (1 - elapsed) + period * (1 - (limit - 1) / current), 1.0)

    def wait_s(self, ident: str) -> float:
        """Seconds the caller must wait before its next request counts; 0 when it may go now.
        Counts nothing (see ``hit`` and ``count``)."""
        window, elapsed = self._position()
        try:
            counts = cache.get_many(self._keys(ident, window))
        except Exception:
            return self._unavailable()
        previous, current = (counts.get(key, 0) for key in self._keys(ident, window))
        return self._wait_s(previous, current, elapsed)

    def hit(self, ident: str) -> float:
        """Count one request if it fits (0 returned); otherwise count nothing and return the
        seconds to wait, so a client that keeps knocking is not kept out longer than one that waits."""
        window, elapsed = self._position()
        previous_key, current_key = self._keys(ident, window)
        try:
            current = self._incr(current_key)
            previous = cache.get(previous_key, 0)
            if previous * (1 - elapsed) + current <= self.rate.count:
                return 0.0
            cache.decr(current_key)
        except Exception:
            return self._unavailable()
        return self._wait_s(previous, current - 1, elapsed)

    def count(self, ident: str) -> None:
        """Count one event whatever the limit says (a failed attempt, for lockouts)."""
        window, _ = self._position()
        try:
            self._incr(self._keys(ident, window)[1])
        except Exception:
            self._unavailable()

    def reset(self, ident: str) -> None:
        window, _ = self._position()
        cache.delete_many(self._keys(ident, window))

    def _incr(self, key: str) -> int:
        # A counter lives through its own window and the next, where it is the "previous" one.
        for _ in range(2):
            cache.add(key, 0, timeout=2 * self.rate.period_s + 1)
            try:
                return cache.incr(key)
            except ValueError:  # expired between add and incr: add it again
                continue
        raise RuntimeError(f"rate counter {key} keeps expiring")

    def _unavailable(self) -> float:
        # Limits guard against abuse; the cache being down must not also take down every
        # request (a unit's heartbeats above all), so they are let through, loudly.
        log.warning("rate limit %s not checked: the cache is unavailable", self.name, exc_info=True)
        return 0.0


def wait_header(wait_s: float) -> str:
    """The Retry-After value for a wait: whole seconds, at least 1."""
    return str(max(math.ceil(wait_s), 1))
