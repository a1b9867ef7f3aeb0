"""Limits counted in the shared cache: exact, sliding, atomic across callers, open when the cache is down."""

import threading
from unittest import mock

import pytest

from marketplace.kernel.ratelimit import Limiter, Rate


class Clock:
    def __init__(self, now: float = 1_000_020.0) -> None:  # 20 s into a minute
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_rate_is_a_count_per_period():
    assert Rate.parse("120/min") == Rate(120, 60)
    assert Rate.parse("10/hour") == Rate(10, 3600)
    for bad in ("0/min", "ten/min", "5/fortnight", "5"):
        with pytest.raises(ValueError, match="is not a rate"):
            Rate.parse(bad)


def test_the_limit_lets_exactly_its_count_through_and_refusals_do_not_count():
    limiter = Limiter("t", "3/min", clock=Clock())

    assert [limiter.hit("a") for _ in range(3)] == [0, 0, 0]
    assert all(limiter.hit("a") > 0 for _ in range(10))
    assert limiter.hit("b") == 0  # another caller has its own budget


def test_the_wait_it_names_is_exact():
    clock = Clock()
    limiter = Limiter("t", "3/min", clock=clock)
    for _ in range(3):
        limiter.hit("a")
    wait = limiter.hit("a")

    clock.now += wait - 1
    assert limiter.hit("a") > 0
    clock.now += 1
    assert limiter.hit("a") == 0


def test_the_window_slides_so_a_burst_at_a_minutes_end_still_counts_after_it():
    clock = Clock(1_000_019.0)  # the last second of a minute (1_000_020 is a multiple of 60)
    limiter = Limiter("t", "3/min", clock=clock)
    for _ in range(3):
        assert limiter.hit("a") == 0

    clock.now += 2  # the next fixed minute has begun
    assert limiter.hit("a") > 0


def test_counted_events_lock_out_until_they_age_out():
    clock = Clock()
    failures = Limiter("t", "2/hour", clock=clock)
    failures.count("addr")
    assert failures.wait_s("addr") == 0
    failures.count("addr")

    assert failures.wait_s("addr") > 0
    clock.now += 2 * 3600
    assert failures.wait_s("addr") == 0


def test_concurrent_callers_never_get_more_than_the_limit_together():
    limiter = Limiter("t", "25/hour")
    allowed = []
    barrier = threading.Barrier(8)

    def caller():
        barrier.wait()
        allowed.extend(1 for _ in range(10) if limiter.hit("shared") == 0)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(allowed) == 25


def test_a_cache_that_is_down_lets_requests_through_and_says_so(caplog):
    limiter = Limiter("t", "1/min")
    broken = mock.Mock(side_effect=ConnectionError("cache down"))
    with mock.patch("marketplace.kernel.ratelimit.cache") as cache:
        cache.incr = cache.get_many = cache.add = broken
        assert [limiter.hit("a") for _ in range(3)] == [0, 0, 0]
        assert limiter.wait_s("a") == 0
    assert "the cache is unavailable" in caplog.text
