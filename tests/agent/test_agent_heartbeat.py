import pytest

from nodes.agent import gpus
from nodes.agent.backoff import Backoff
from nodes.agent.client import RateLimited, Unreachable
from nodes.agent.heartbeat import Heartbeater


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class StubClient:
    def __init__(self) -> None:
        self.replies: list = []
        self.sent: list = []
        self.countries: list = []

    def heartbeat(self, *, gpus, running, advertise=None, limits=None, country=None):
        self.sent.append(running)
        self.countries.append(country)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def ok(interval=5, cancel=(), preempt=None):
    reply = {"status": "online", "heartbeat_interval_s": interval, "cancel": list(cancel)}
    if preempt is not None:  # older servers never send the key
        reply["preempt"] = list(preempt)
    return reply


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def client():
    return StubClient()


def heartbeater(client, clock, rng=lambda: 0.5):
    return Heartbeater(client, gpus.simulate("1xH100-80GB", "u"), clock=clock, rng=rng)


def next_beat_after(beater, client, clock, step=0.01) -> float:
    """Seconds until the heartbeater sends again."""
    sent, began = len(client.sent), clock.now
    while len(client.sent) == sent:
        clock.now += step
        beater.beat_if_due([])
    return round(clock.now - began, 2)


def test_the_first_heartbeat_goes_at_once_and_returns_the_cancel_list(client, clock):
    client.replies = [ok(cancel=["a-1"])]

    assert heartbeater(client, clock).beat_if_due(["a-1", "a-2"]) == ["a-1"]
    assert client.sent == [["a-1", "a-2"]]


def test_an_answer_without_preempt_preempts_nothing(client, clock):
    client.replies = [ok(cancel=["a-1", "a-2"])]
    beater = heartbeater(client, clock)

    assert beater.beat_if_due(["a-1", "a-2"]) == ["a-1", "a-2"]
    assert beater.preempting == set()


def test_preempted_allocations_come_after_the_cancelled_ones_each_once_and_are_remembered(client, clock):
    client.replies = [ok(cancel=["a-1", "a-2"], preempt=["a-3", "a-2", "a-4"])]
    beater = heartbeater(client, clock)

    assert beater.beat_if_due(["a-1", "a-2", "a-3", "a-4"]) == ["a-1", "a-2", "a-3", "a-4"]
    assert beater.preempting == {"a-2", "a-3", "a-4"}


def test_each_answer_replaces_what_is_being_preempted(client, clock):
    client.replies = [ok(preempt=["a-1"]), Unreachable("down"), ok(cancel=["a-1"])]
    beater = heartbeater(client, clock)

    assert beater.beat_if_due(["a-1"]) == ["a-1"]
    assert beater.preempting == {"a-1"}
    clock.now += 10
    assert beater.beat_if_due(["a-1"]) == []
    assert beater.preempting == {"a-1"}  # a failed beat changes nothing
    clock.now += 10
    assert beater.beat_if_due(["a-1"]) == ["a-1"]
    assert beater.preempting == set()


@pytest.mark.parametrize(("rng", "expected"), [(0.0, 9.0), (0.5, 10.0), (0.999, 11.0)])
def test_heartbeats_follow_the_servers_interval_with_ten_percent_jitter(client, clock, rng, expected):
    client.replies = [ok(interval=10), ok(interval=10)]
    beater = heartbeater(client, clock, rng=lambda: rng)
    beater.beat_if_due([])

    assert next_beat_after(beater, client, clock) == pytest.approx(expected, abs=0.02)


def test_errors_retry_sooner_than_the_interval_backing_off_up_to_it(client, clock):
    client.replies = [ok(interval=5)] + [Unreachable("down")] * 5 + [ok(interval=5)] * 2
    beater = heartbeater(client, clock, rng=lambda: 0.999)
    beater.beat_if_due([])

    gaps = [next_beat_after(beater, client, clock) for _ in range(7)]

    assert gaps == pytest.approx([5.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.5], abs=0.02)
    assert beater.healthy


def test_a_rate_limit_waits_at_least_retry_after(client, clock):
    client.replies = [RateLimited("busy", status=429, retry_after=30), ok()]
    beater = heartbeater(client, clock)
    beater.beat_if_due([])

    assert next_beat_after(beater, client, clock, step=0.5) == pytest.approx(30, abs=0.5)


def test_backoff_doubles_with_jitter_up_to_its_cap_and_resets_on_success():
    backoff = Backoff(base_s=1, cap_s=8, rng=lambda: 0.0)

    assert [backoff.failure() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    backoff.success()
    assert backoff.failure() == 0.5


def test_every_heartbeat_reports_the_configured_country(clock):
    client = StubClient()
    client.replies = [ok(interval=1), ok(interval=1)]
    beater = Heartbeater(client, gpus.simulate("1xH100-80GB", "u"), clock=clock, rng=lambda: 0.5, country="FR")

    beater.beat_if_due([])
    clock.now += 2
    beater.beat_if_due([])

    assert client.countries == ["FR", "FR"]
