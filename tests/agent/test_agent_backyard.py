"""Each backyard limit changes what the agent advertises, and says why."""

from datetime import UTC, datetime

import pytest

from nodes.agent.backyard import Backyard, GpuReading, Policy

NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
MIDNIGHT = datetime(2026, 6, 1, 23, 30, tzinfo=UTC)


def gpus(count: int, *, temperature_c: int = 50, power_w: int = 100, power_limit_w: int = 700) -> list[GpuReading]:
    return [GpuReading(f"GPU-{i}", True, temperature_c, power_w, power_limit_w) for i in range(count)]


def quiet(start="22:00", end="07:00", zone="UTC", max_gpus=0, power_cap_w=None) -> Policy:
    window = {"start": start, "end": end, "time_zone": zone, "max_gpus": max_gpus, "power_cap_w": power_cap_w}
    return Policy.from_server({"quiet_hours": window})


def test_without_limits_every_free_healthy_gpu_is_advertised():
    shed = gpus(4)
    shed[3] = GpuReading("GPU-3", healthy=False)

    limits = Backyard().evaluate(Policy(), shed, busy={"GPU-0"}, now=NOON)

    assert limits.advertise == ["GPU-1", "GPU-2"]
    assert limits.in_force == []


def test_quiet_hours_advertise_nothing_and_say_so():
    limits = Backyard().evaluate(quiet(), gpus(4), busy=set(), now=MIDNIGHT)

    assert limits.advertise == []
    assert limits.in_force == ["quiet_hours"]
    assert limits.report(total=4) == {"in_force": ["quiet_hours"], "advertised_gpus": 0, "gpus": 4}


def test_quiet_hours_can_allow_a_few_gpus_counting_those_already_busy_and_cap_their_power():
    limits = Backyard().evaluate(quiet(max_gpus=2, power_cap_w=300), gpus(4), busy={"GPU-0"}, now=MIDNIGHT)

    assert limits.advertise == ["GPU-1"]
    assert limits.power_cap_w == 300


def test_quiet_hours_are_read_in_the_units_own_time_zone():
    # 21:30 UTC is 23:30 in Berlin in summer: quiet there, not in UTC.
    evening = datetime(2026, 6, 1, 21, 30, tzinfo=UTC)

    assert Backyard().evaluate(quiet(zone="Europe/Berlin"), gpus(2), set(), evening).advertise == []
    assert Backyard().evaluate(quiet(zone="UTC"), gpus(2), set(), evening).advertise == ["GPU-0", "GPU-1"]


def test_a_daytime_window_that_does_not_cross_midnight():
    policy = quiet(start="12:00", end="14:00")

    assert Backyard().evaluate(policy, gpus(1), set(), NOON).in_force == ["quiet_hours"]
    assert Backyard().evaluate(policy, gpus(1), set(), MIDNIGHT).in_force == []


def test_the_power_budget_counts_measured_draw_and_each_new_job_at_full_power():
    # 4 GPUs drawing 100 W each = 400 W; each new job may add 600 W more; a 2 kW budget fits 2.
    limits = Backyard().evaluate(Policy(power_budget_w=2000), gpus(4), busy=set(), now=NOON)

    assert limits.advertise == ["GPU-0", "GPU-1"]
    assert limits.in_force == ["power_budget"]


def test_a_unit_already_at_its_budget_takes_nothing_new():
    limits = Backyard().evaluate(Policy(power_budget_w=400), gpus(4), busy=set(), now=NOON)

    assert limits.advertise == []


def test_quiet_hour_power_caps_let_more_jobs_fit_the_budget():
    policy = Policy.from_server(
        {"power_budget_w": 1000, "quiet_hours": {"start": "22:00", "end": "07:00", "max_gpus": 4, "power_cap_w": 300}}
    )

    limits = Backyard().evaluate(policy, gpus(4), busy=set(), now=MIDNIGHT)

    assert limits.advertise == ["GPU-0", "GPU-1", "GPU-2"]  # 400 W + 3 x 200 W = 1000 W
    assert limits.in_force == ["quiet_hours", "power_budget"]


@pytest.mark.parametrize(
    ("readings", "held"),
    [
        ([60, 70, 83], True),  # reaches the stop threshold: hold
        ([83, 80, 76], True),  # cooling, but not yet at the resume threshold: still held
        ([83, 75], False),  # back at the resume threshold: take work again
        ([82, 79], False),  # never reached the stop threshold
    ],
)
def test_thermal_derating_has_hysteresis(readings, held):
    backyard = Backyard()
    policy = Policy(thermal_stop_c=83, thermal_resume_c=75)
    for temperature in readings:
        limits = backyard.evaluate(policy, gpus(2, temperature_c=temperature), set(), NOON)

    assert (limits.advertise == []) is held
    assert ("thermal" in limits.in_force) is held


def test_a_policy_from_the_server_tolerates_missing_and_unknown_values():
    policy = Policy.from_server({"quiet_hours": {"start": "22:00", "end": "06:00", "time_zone": "Mars/Olympus"}})

    assert policy.quiet_hours is not None and str(policy.quiet_hours.zone) == "UTC"
    assert Policy.from_server(None) == Policy()
