"""Owner availability windows: when a unit takes jobs, in its own time zone.

A window is ``{"days": [0, 1, 2, 3, 4], "start": "08:00", "end": "20:00"}`` (0 is Monday). An
end earlier than the start runs past midnight into the next day; ``"24:00"`` is midnight at the
end of the day. An empty list means always available.

Placement asks, per distinct policy and pass, whether a job's whole span fits. Windows are
parsed once (cached on a hashable ``key``) into the union of their intervals over one week, with
touching intervals merged, so a job may run through consecutive windows without a gap. A query is
then one bisect per stretch of constant UTC offset: the span is cut at daylight-saving changes,
because windows are wall-clock times and the wall clock jumps there.
"""

import bisect
import math
import re
from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY = 86_400
WEEK = 7 * DAY
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")
_KEYS = {"days", "start", "end"}

# One window as a hashable tuple: (days, start minute, end minute).
Key = tuple[tuple[tuple[int, ...], int, int], ...]


class Schedule:
    """The union of a policy's windows over one week, in seconds from Monday 00:00."""

    __slots__ = ("always", "ends", "starts")

    def __init__(self, intervals: list[tuple[int, int]]):
        merged = _merge(intervals)
        self.always = merged == [(0, WEEK)]
        if len(merged) > 1 and merged[0][0] == 0 and merged[-1][1] == WEEK:
            # Sunday night runs into Monday morning: the last interval reaches on into the first.
            merged[-1] = (merged[-1][0], WEEK + merged[0][1])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    def reach(self, position: float) -> float:
        """Seconds of availability from ``position`` (seconds into the week) on; 0 outside."""
        i = bisect.bisect_right(self.starts, position) - 1
        if i < 0 or position >= self.ends[i]:
            return 0.0
        return self.ends[i] - position


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-touching intervals within [0, WEEK)."""
    split: list[tuple[int, int]] = []
    for s, e in intervals:
        if e > WEEK:
            split += [(s, WEEK), (0, e - WEEK)]
        else:
            split.append((s, e))
    merged: list[tuple[int, int]] = []
    for s, e in sorted(split):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _minutes(value, *, field: str, where: str, allow_24: bool) -> int:
    match = _TIME.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f'{where}: {field} must be a time as "HH:MM", e.g. "08:00".')
    hours, minutes = int(match[1]), int(match[2])
    total = hours * 60 + minutes
    if minutes > 59 or total > (24 * 60 if allow_24 else 24 * 60 - 1):
        latest = "24:00" if allow_24 else "23:59"
        raise ValueError(f'{where}: {field} "{value}" is not a time between 00:00 and {latest}.')
    return total


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _window(raw, where: str) -> tuple[tuple[int, ...], int, int]:
    if not isinstance(raw, dict):
        raise ValueError(f'{where} must be an object like {{"days": [0, 1], "start": "08:00", "end": "20:00"}}.')
    if set(raw) != _KEYS:
        missing, extra = sorted(_KEYS - set(raw)), sorted(set(raw) - _KEYS)
        problem = f"is missing {', '.join(missing)}" if missing else f"has unknown keys {', '.join(map(str, extra))}"
        raise ValueError(f"{where} {problem}; a window has exactly days, start and end.")
    days = raw["days"]
    if (
        not isinstance(days, list)
        or not days
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 6 for d in days)
    ):
        raise ValueError(f"{where}: days must be a non-empty list of weekdays, 0 (Monday) to 6 (Sunday).")
    start = _minutes(raw["start"], field="start", where=where, allow_24=False)
    end = _minutes(raw["end"], field="end", where=where, allow_24=True)
    if start == end:
        raise ValueError(f"{where}: start and end are the same time; use 00:00 to 24:00 for a whole day.")
    return tuple(sorted(set(days))), start, end


def _parse(windows) -> Key:
    if not isinstance(windows, list | tuple):
        raise ValueError("Availability must be a list of windows (an empty list means always).")
    return tuple(_window(raw, f"Window {n}") for n, raw in enumerate(windows, start=1))


def validate(windows) -> list[dict]:
    """The windows normalised (days unique and sorted, times zero-padded); ValueError otherwise."""
    return [{"days": list(days), "start": _hhmm(s), "end": _hhmm(e)} for days, s, e in _parse(windows)]


# The key of windows that cannot be read: no day, so no interval, so never available.
NEVER: Key = (((), 0, 0),)


def key(windows) -> Key:
    """A hashable form of stored windows, for ``allows`` and caches. Never raises: windows that
    cannot be read give ``NEVER``, because a policy nobody can read promises no availability
    (``validate`` is where an owner is told what is wrong)."""
    if not windows:
        return ()
    if isinstance(windows, tuple):
        return windows
    try:
        # With all three keys present, a length of 3 means no others: validate() refuses extras.
        raw = tuple((tuple(w["days"]), w["start"], w["end"], len(w)) for w in windows)
        return _key_of_raw(raw)
    except (TypeError, KeyError, IndexError):
        return NEVER


@lru_cache(maxsize=4096)
def _key_of_raw(raw: tuple) -> Key:
    if any(size != len(_KEYS) for *_, size in raw):
        return NEVER
    try:
        return _parse([{"days": list(days), "start": start, "end": end} for days, start, end, _ in raw])
    except ValueError:
        return NEVER


@lru_cache(maxsize=4096)
def schedule(windows_key: Key) -> Schedule:
    """The week's merged intervals for a ``key``."""
    intervals = []
    for days, start, end in windows_key:
        length = (end - start) * 60 if end > start else (24 * 60 - start + end) * 60
        intervals += [(day * DAY + start * 60, day * DAY + start * 60 + length) for day in days]
    return Schedule(intervals)


@lru_cache(maxsize=1024)
def _zone(time_zone: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _week_position(local: datetime) -> float:
    return local.weekday() * DAY + local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6


def _offset(zone: ZoneInfo, ts: float) -> timedelta:
    return datetime.fromtimestamp(ts, zone).utcoffset()


def _stretches(zone: ZoneInfo, begin: float, end: float):
    """(local start, seconds) pieces of [begin, end] with one UTC offset each.

    Finds each change by bisection on whole seconds (zones change offset on whole seconds).
    Assumes the offset changes at most once between two instants with the same offset, which
    holds for spans of a week or less in every zone in use. A change at the very end of the span
    starts no piece: the job is over by then.
    """
    while True:
        local = datetime.fromtimestamp(begin, zone)
        first = local.utcoffset()
        if _offset(zone, end) == first:
            yield local, end - begin
            return
        lo, hi = math.floor(begin), math.ceil(end)  # offset(lo) == first != offset(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _offset(zone, mid) == first else (lo, mid)
        yield local, hi - begin
        if hi >= end:
            return
        begin = hi


def allows(windows: list[dict] | Key, time_zone: str, start: datetime, duration_s: int) -> bool:
    """Whether a job running ``duration_s`` from ``start`` stays inside the windows throughout.

    ``windows`` is the stored list of dicts or its ``key``. ``start`` must be time-zone aware.
    An unreadable policy or unknown time zone allows nothing (unless the windows are empty).
    """
    if not windows:
        return True
    plan = schedule(key(windows))
    if plan.always:
        return True
    if duration_s > WEEK or duration_s < 0:
        return False  # longer than the week's longest unbroken stretch, which is shorter
    if start.tzinfo is None:
        raise ValueError("allows() needs a time-zone aware start.")
    zone = _zone(time_zone)
    if zone is None:
        return False
    begin = start.timestamp()
    for local, seconds in _stretches(zone, begin, begin + duration_s):
        # Each piece must start inside a window and run no further than its unbroken stretch.
        reach = plan.reach(_week_position(local))
        if reach == 0 or reach < seconds:
            return False
    return True


def remaining_s(windows: list[dict] | Key, time_zone: str, at: datetime) -> int | None:
    """Seconds the unit stays available from ``at`` on, by its wall clock; None means always,
    0 means not now. Daylight-saving changes inside the stretch are not accounted for."""
    if not windows:
        return None
    plan = schedule(key(windows))
    if plan.always:
        return None
    zone = _zone(time_zone)
    if zone is None:
        return 0
    return int(plan.reach(_week_position(at.astimezone(zone))))


# The portal's text form: one window per line, e.g. "mon-fri 08:00-20:00" or "sat, sun 22:00-06:00".
DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_WORDS = {"daily": range(7), "weekdays": range(5), "weekends": range(5, 7)}
_LINE = re.compile(r"^(?P<days>.+?)\s+(?P<start>\d{1,2}:\d{2})\s*[-–]\s*(?P<end>\d{1,2}:\d{2})$")


def _day(word: str, where: str) -> int:
    for number, name in enumerate(DAY_NAMES):
        if len(word) >= 3 and name.startswith(word):
            return number
    raise ValueError(f'{where}: "{word}" is not a day; use mon, tue, wed, thu, fri, sat, sun.')


def _days(text: str, where: str) -> list[int]:
    days: list[int] = []
    for item in (part.strip() for part in text.lower().split(",")):
        if item in _DAY_WORDS:
            days += _DAY_WORDS[item]
            continue
        first, _, last = (end.strip() for end in item.replace("–", "-").partition("-"))
        a = _day(first, where)
        b = _day(last, where) if last else a
        days += [(a + k) % 7 for k in range((b - a) % 7 + 1)]  # "fri-mon" runs over the weekend
    return days


def parse_text(text: str) -> list[dict]:
    """Windows from the portal's lines, validated; ValueError naming the line otherwise."""
    windows = []
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for n, line in lines:
        match = _LINE.match(line)
        if not match:
            raise ValueError(f'Line {n}: write days then times, e.g. "mon-fri 08:00-20:00".')
        window = {"days": _days(match["days"], f"Line {n}"), "start": match["start"], "end": match["end"]}
        try:
            windows += validate([window])
        except ValueError as error:
            raise ValueError(str(error).replace("Window 1", f"Line {n}", 1)) from None
    return windows


def format_text(windows: list[dict]) -> str:
    """The portal's lines for stored windows: consecutive days as ranges ("mon-fri")."""
    return "\n".join(f"{_days_text(w['days'])} {w['start']}-{w['end']}" for w in validate(windows))


def _days_text(days: list[int]) -> str:
    if len(days) == 7:
        return "daily"
    runs: list[list[int]] = []
    for day in days:
        if runs and day == runs[-1][-1] + 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    names = [DAY_NAMES[d][:3] for d in range(7)]
    return ", ".join(names[r[0]] if len(r) == 1 else f"{names[r[0]]}-{names[r[-1]]}" for r in runs)
