"""Owner availability windows: validation, and whether a job's whole span fits them."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes import availability

BERLIN = ZoneInfo("Europe/Berlin")
HOUR = 3600
WEEKDAYS_9_TO_5 = [{"days": [0, 1, 2, 3, 4], "start": "09:00", "end": "17:00"}]
NIGHTS = [{"days": [4, 5, 6], "start": "22:00", "end": "06:00"}]


def at(*args, tz=UTC) -> datetime:
    return datetime(*args, tzinfo=tz)


# 2024-06-03 is a Monday.
MONDAY = (2024, 6, 3)


def test_validate_normalises_days_and_times():
    assert availability.validate([{"days": [4, 0, 0, 2], "start": "8:00", "end": "24:00"}]) == [
        {"days": [0, 2, 4], "start": "08:00", "end": "24:00"}
    ]


def test_validate_accepts_no_windows_as_always():
    assert availability.validate([]) == []


@pytest.mark.parametrize(
    "windows, message",
    [
        ({"days": [0]}, "must be a list of windows"),
        (["weekdays"], "Window 1 must be an object"),
        ([{"days": [0], "start": "08:00"}], "Window 1 is missing end"),
        ([{"days": [0], "start": "08:00", "end": "09:00", "tz": "UTC"}], "unknown keys tz"),
        ([{"days": [], "start": "08:00", "end": "09:00"}], "days must be a non-empty list"),
        ([{"days": [7], "start": "08:00", "end": "09:00"}], "0 (Monday) to 6 (Sunday)"),
        ([{"days": [True], "start": "08:00", "end": "09:00"}], "days must be"),
        ([{"days": [0], "start": "8am", "end": "09:00"}], 'start must be a time as "HH:MM"'),
        ([{"days": [0], "start": "24:00", "end": "09:00"}], "between 00:00 and 23:59"),
        ([{"days": [0], "start": "08:00", "end": "24:01"}], "between 00:00 and 24:00"),
        ([{"days": [0], "start": "08:60", "end": "09:00"}], "is not a time"),
        ([{"days": [0], "start": "08:00", "end": 9}], "end must be a time"),
        ([WEEKDAYS_9_TO_5[0], {"days": [0], "start": "08:00", "end": "08:00"}], "Window 2: start and end"),
    ],
)
def test_validate_rejects_bad_windows_readably(windows, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        availability.validate(windows)


def test_no_windows_allow_anything():
    assert availability.allows([], "Europe/Berlin", at(*MONDAY, 3), 30 * 24 * HOUR)


def test_a_span_inside_one_window_is_allowed_and_one_past_its_end_is_not():
    start = at(*MONDAY, 9, tz=BERLIN)

    assert availability.allows(WEEKDAYS_9_TO_5, "Europe/Berlin", start, 8 * HOUR)
    assert not availability.allows(WEEKDAYS_9_TO_5, "Europe/Berlin", start, 8 * HOUR + 1)
    assert not availability.allows(WEEKDAYS_9_TO_5, "Europe/Berlin", at(*MONDAY, 8, 59, tz=BERLIN), HOUR)


def test_windows_are_read_in_the_units_time_zone():
    # 07:30 UTC is 09:30 in Berlin in summer.
    assert availability.allows(WEEKDAYS_9_TO_5, "Europe/Berlin", at(*MONDAY, 7, 30), HOUR)
    assert not availability.allows(WEEKDAYS_9_TO_5, "UTC", at(*MONDAY, 7, 30), HOUR)


def test_a_zero_length_span_needs_its_start_inside_a_window():
    assert availability.allows(WEEKDAYS_9_TO_5, "UTC", at(*MONDAY, 9), 0)
    assert not availability.allows(WEEKDAYS_9_TO_5, "UTC", at(*MONDAY, 17), 0)


def test_touching_windows_chain_into_one_stretch():
    windows = [{"days": [0], "start": "00:00", "end": "24:00"}, {"days": [1], "start": "00:00", "end": "08:00"}]

    assert availability.allows(windows, "UTC", at(*MONDAY, 20), 12 * HOUR)
    assert not availability.allows(windows, "UTC", at(*MONDAY, 20), 12 * HOUR + 1)


def test_an_overnight_window_runs_into_the_next_day_and_sunday_into_monday():
    sunday_night = at(2024, 6, 9, 23)

    assert availability.allows(NIGHTS, "UTC", sunday_night, 7 * HOUR)
    assert availability.allows(NIGHTS, "UTC", at(*MONDAY, 5), HOUR)
    assert not availability.allows(NIGHTS, "UTC", at(*MONDAY, 5), HOUR + 1)
    assert not availability.allows(NIGHTS, "UTC", at(2024, 6, 4, 23), HOUR)  # Tuesday night is not listed


def test_weekend_nights_chain_through_overlapping_windows():
    windows = NIGHTS + [{"days": [5, 6], "start": "00:00", "end": "24:00"}]

    assert availability.allows(windows, "UTC", at(2024, 6, 7, 22), 56 * HOUR)  # Friday 22:00 to Monday 06:00
    assert not availability.allows(windows, "UTC", at(2024, 6, 7, 21, 59), 56 * HOUR)


def test_spans_longer_than_a_week_need_the_whole_week():
    whole_week = [{"days": list(range(7)), "start": "00:00", "end": "24:00"}]
    in_pieces = [
        {"days": list(range(7)), "start": "06:00", "end": "24:00"},
        {"days": list(range(7)), "start": "00:00", "end": "06:00"},
    ]
    nearly = [{"days": list(range(7)), "start": "00:01", "end": "24:00"}]
    week = 7 * 24 * HOUR

    assert availability.allows(whole_week, "UTC", at(*MONDAY, 12), 3 * week)
    assert availability.allows(in_pieces, "UTC", at(*MONDAY, 12), 3 * week)
    assert not availability.allows(nearly, "UTC", at(*MONDAY, 12), week + 1)


@pytest.mark.parametrize(
    "windows",
    [
        [{"days": [9], "start": "00:00", "end": "24:00"}],
        [{"days": [0, 1, 2, 3, 4, 5, 6], "start": "00:00", "end": "24:00", "tz": "UTC"}],
        [{"days": "all", "start": "00:00", "end": "24:00"}],
        [{"days": [[0]], "start": "00:00", "end": "24:00"}],
        [{"days": [0]}],
        ["always"],
        [7],
        {"days": [0], "start": "00:00", "end": "24:00"},
    ],
)
def test_an_unreadable_policy_allows_nothing_and_never_raises(windows):
    assert availability.key(windows) == availability.NEVER
    assert not availability.allows(windows, "UTC", at(*MONDAY, 12), 60)
    assert availability.remaining_s(windows, "UTC", at(*MONDAY, 12)) == 0


def test_an_unknown_time_zone_allows_nothing_but_no_windows_still_allow_all():
    assert not availability.allows(WEEKDAYS_9_TO_5, "Mars/Olympus", at(*MONDAY, 12), 60)
    assert availability.allows([], "Mars/Olympus", at(*MONDAY, 12), 60)


def test_the_key_form_answers_like_the_stored_windows():
    windows_key = availability.key(WEEKDAYS_9_TO_5)

    assert hash(windows_key) is not None
    assert availability.allows(windows_key, "UTC", at(*MONDAY, 9), 8 * HOUR)
    assert not availability.allows(windows_key, "UTC", at(*MONDAY, 9), 8 * HOUR + 1)


def test_a_naive_start_is_refused():
    with pytest.raises(ValueError, match="aware"):
        availability.allows(WEEKDAYS_9_TO_5, "UTC", datetime(*MONDAY, 9), 60)


def test_remaining_seconds_say_how_long_the_unit_stays_available():
    assert availability.remaining_s([], "UTC", at(*MONDAY, 9)) is None
    assert availability.remaining_s(WEEKDAYS_9_TO_5, "UTC", at(*MONDAY, 16)) == HOUR
    assert availability.remaining_s(WEEKDAYS_9_TO_5, "UTC", at(*MONDAY, 18)) == 0


# Berlin springs forward on 2024-03-31 at 02:00 (to 03:00) and falls back on 2024-10-27 at 03:00
# (to 02:00). Both are Sundays.
SUNDAY_EARLY = [{"days": [6], "start": "00:00", "end": "04:00"}]


def test_spring_forward_skips_an_hour_of_wall_clock():
    start = at(2024, 3, 31, 0, tz=BERLIN)

    # 00:00 to 04:00 on the wall is only three real hours that night.
    assert availability.allows(SUNDAY_EARLY, "Europe/Berlin", start, 3 * HOUR)
    assert not availability.allows(SUNDAY_EARLY, "Europe/Berlin", start, 3 * HOUR + 1)


def test_fall_back_repeats_an_hour_of_wall_clock():
    start = at(2024, 10, 27, 0, tz=BERLIN)

    # The same wall-clock window holds five real hours that night.
    assert availability.allows(SUNDAY_EARLY, "Europe/Berlin", start, 5 * HOUR)
    assert not availability.allows(SUNDAY_EARLY, "Europe/Berlin", start, 5 * HOUR + 1)


def test_a_job_ending_exactly_at_the_clock_change_fits_a_window_ending_there():
    windows = [{"days": [6], "start": "00:00", "end": "02:00"}]

    assert availability.allows(windows, "Europe/Berlin", at(2024, 3, 31, 0, tz=BERLIN), 2 * HOUR)
    assert not availability.allows(windows, "Europe/Berlin", at(2024, 3, 31, 0, tz=BERLIN), 2 * HOUR + 1)


def test_a_window_in_the_repeated_hour_covers_both_passes():
    windows = [{"days": [6], "start": "02:00", "end": "03:00"}]
    first_pass = at(2024, 10, 27, 0, 0)  # 02:00 CEST
    second_pass = at(2024, 10, 27, 1, 0)  # 02:00 CET

    assert availability.allows(windows, "Europe/Berlin", first_pass, HOUR)
    assert availability.allows(windows, "Europe/Berlin", second_pass, HOUR)
    # From the first 02:00 the wall clock reads 02:00 to 03:00 twice over.
    assert availability.allows(windows, "Europe/Berlin", first_pass, 2 * HOUR)
    assert not availability.allows(windows, "Europe/Berlin", first_pass, 2 * HOUR + 1)
    assert not availability.allows(windows, "Europe/Berlin", second_pass, HOUR + 1)


# Property tests against a slow oracle that looks at the wall clock minute by minute.

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]

times = st.integers(min_value=0, max_value=24 * 60).map(lambda m: f"{m // 60:02d}:{m % 60:02d}")
window = st.fixed_dictionaries(
    {
        "days": st.lists(st.integers(0, 6), min_size=1, max_size=7),
        "start": times.filter(lambda t: t != "24:00"),
        "end": times,
    }
).filter(lambda w: w["start"] != w["end"])
windows_lists = st.lists(window, max_size=4)
# Whole minutes across 2024, which has every zone's DST changes in it.
starts = st.integers(min_value=0, max_value=366 * 24 * 60).map(lambda m: at(2024, 1, 1) + timedelta(minutes=m))


def _minute(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def oracle_open(windows: list[dict], local: datetime) -> bool:
    minute, day = local.hour * 60 + local.minute, local.weekday()
    for w in windows:
        start, end = _minute(w["start"]), _minute(w["end"])
        if start < end and day in w["days"] and start <= minute < end:
            return True
        if start > end and ((day in w["days"] and minute >= start) or ((day - 1) % 7 in w["days"] and minute < end)):
            return True
    return False


def oracle_allows(windows, time_zone, start, minutes) -> bool:
    if not windows:
        return True
    zone = ZoneInfo(time_zone)
    steps = range(max(minutes, 1))
    return all(oracle_open(windows, (start + timedelta(minutes=k)).astimezone(zone)) for k in steps)


@settings(max_examples=300, deadline=None)
@given(windows_lists, st.sampled_from(ZONES), starts, st.integers(min_value=0, max_value=3 * 24 * 60))
def test_allows_agrees_with_a_minute_by_minute_oracle(windows, time_zone, start, minutes):
    expected = oracle_allows(windows, time_zone, start, minutes)

    assert availability.allows(windows, time_zone, start, minutes * 60) == expected


@settings(max_examples=300, deadline=None)
@given(windows_lists, st.sampled_from(ZONES), starts, st.integers(0, 8 * 24 * HOUR), st.integers(0, 8 * 24 * HOUR))
def test_a_shorter_span_from_the_same_start_is_allowed_whenever_a_longer_one_is(windows, tz, start, a, b):
    shorter, longer = sorted((a, b))

    if availability.allows(windows, tz, start, longer):
        assert availability.allows(windows, tz, start, shorter)


@settings(max_examples=200, deadline=None)
@given(windows_lists, st.sampled_from(ZONES), starts, st.integers(0, 30 * 24 * HOUR))
def test_allows_is_the_same_for_stored_windows_and_their_key(windows, tz, start, seconds):
    assert availability.allows(windows, tz, start, seconds) == availability.allows(
        availability.key(windows), tz, start, seconds
    )


@settings(max_examples=200, deadline=None)
@given(windows_lists)
def test_validating_twice_changes_nothing(windows):
    once = availability.validate(windows)

    assert availability.validate(once) == once


def test_the_portal_text_form_reads_day_names_ranges_and_words():
    text = "Mon-Fri 08:00-20:00\n\nfri-mon 22:00–06:00\nweekends 00:00-24:00\nTuesday, thu 9:00-10:00"

    assert availability.parse_text(text) == [
        {"days": [0, 1, 2, 3, 4], "start": "08:00", "end": "20:00"},
        {"days": [0, 4, 5, 6], "start": "22:00", "end": "06:00"},
        {"days": [5, 6], "start": "00:00", "end": "24:00"},
        {"days": [1, 3], "start": "09:00", "end": "10:00"},
    ]


@settings(max_examples=200, deadline=None)
@given(windows_lists)
def test_the_portal_text_form_round_trips(windows):
    assert availability.parse_text(availability.format_text(windows)) == availability.validate(windows)
