"""Bar charts for the owner portal, drawn on the server as inline SVG.

No script and no CDN: the chart is markup in the page, so it shows with JavaScript off. It is one
image to a screen reader (``role="img"`` with its title and description); the page puts the same
numbers in a table next to it. Colours are dark on white, at least 4.5:1 against the background.
"""

from dataclasses import dataclass
from decimal import Decimal

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from marketplace.kernel.templatetags.money import micros

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 12, 28
BAR = "#1d3b2a"  # 11.6:1 on white
INK = "#1b1f23"
GRID = "#8a939e"
LABEL_EVERY = 7


@dataclass(frozen=True)
class Bar:
    label: str  # on the x axis, e.g. "05-01"
    value: int | Decimal  # in the chart's scale (micros, percent)
    text: str  # the value in words, for the bar's tooltip: "2025-05-01: 1.80 USD"


def bar_chart(
    *, chart_id: str, title: str, desc: str, bars: list[Bar], ticks: list[tuple[int | Decimal, str]]
) -> SafeString:
    """An SVG bar chart; ``ticks`` are (value, text) on the y axis, the last one its top. Every
    piece goes through ``format_html``, so a unit's name cannot put markup into the page."""
    top = float(ticks[-1][0]) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(bars), 1)
    parts = [
        format_html(
            '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="100%" role="img" '
            'aria-labelledby="{id}-title {id}-desc" id="{id}" class="chart">'
            '<title id="{id}-title">{title}</title><desc id="{id}-desc">{desc}</desc>'
            '<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>',
            w=WIDTH,
            h=HEIGHT,
            id=chart_id,
            title=title,
            desc=desc,
        )
    ]
    for value, text in ticks:
        parts.append(
            format_html(
                '<line x1="{left}" x2="{right}" y1="{y}" y2="{y}" stroke="{grid}" stroke-width="0.5"/>'
                '<text x="{x}" y="{y}" text-anchor="end" dominant-baseline="middle" font-size="12" fill="{ink}">'
                "{text}</text>",
                left=LEFT,
                right=WIDTH - RIGHT,
                y=f"{TOP + plot_h - plot_h * float(value) / top:.1f}",
                x=LEFT - 6,
                grid=GRID,
                ink=INK,
                text=text,
            )
        )
    for i, bar in enumerate(bars):
        height = plot_h * min(float(bar.value) / top, 1.0)
        x = LEFT + i * slot + slot * 0.15
        parts.append(
            format_html(
                '<rect class="bar" x="{x}" y="{y}" width="{w}" height="{h}" fill="{fill}"><title>{text}</title></rect>',
                x=f"{x:.1f}",
                y=f"{TOP + plot_h - height:.1f}",
                w=f"{slot * 0.7:.1f}",
                h=f"{height:.1f}",
                fill=BAR,
                text=bar.text,
            )
        )
        # A label every week, counted back from the last bar so today is always labelled.
        if (len(bars) - 1 - i) % LABEL_EVERY == 0:
            parts.append(
                format_html(
                    '<text x="{x}" y="{y}" text-anchor="middle" font-size="12" fill="{ink}">{label}</text>',
                    x=f"{x + slot * 0.35:.1f}",
                    y=HEIGHT - 8,
                    ink=INK,
                    label=bar.label,
                )
            )
    return format_html("{}</svg>", format_html_join("", "{}", ((part,) for part in parts)))


def nice_top(value: int, *, floor: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (and ``floor``)."""
    step = floor
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def earnings_chart(days: list[dict], currency: str) -> SafeString:
    """``days``: {"day", "earned_micros"} for each day, oldest first."""
    top = nice_top(max((day["earned_micros"] for day in days), default=0), floor=10_000)
    bars = [
        Bar(
            f"{day['day']:%m-%d}",
            day["earned_micros"],
            f"{day['day']:%Y-%m-%d}: {micros(day['earned_micros'])} {currency}",
        )
        for day in days
    ]
    return bar_chart(
        chart_id="earnings-chart",
        title="Earnings per day",
        desc=f"What your units earned each UTC day, in {currency}, after the platform fee, over the last "
        f"{len(days)} days; the table below gives the same numbers.",
        bars=bars,
        ticks=[(0, "0"), (top // 2, micros(top // 2)), (top, micros(top))],
    )


def utilisation_chart(unit: dict, index: int) -> SafeString:
    """``unit``: {"name", "days": [{"day", "percent"}]}, as ``owner_unit_utilisation`` gives."""
    bars = [
        Bar(f"{day['day']:%m-%d}", day["percent"], f"{day['day']:%Y-%m-%d}: {day['percent']}%") for day in unit["days"]
    ]
    return bar_chart(
        chart_id=f"utilisation-chart-{index}",
        title=f"Utilisation of {unit['name']} per day",
        desc=f"Share of the GPU time of {unit['name']} used by jobs each UTC day, in percent, over the last "
        f"{len(bars)} days; the table below gives the same numbers.",
        bars=bars,
        ticks=[(0, "0%"), (50, "50%"), (100, "100%")],
    )
