from datetime import datetime

from django import template
from django.utils import timezone
from django.utils.timesince import timesince

register = template.Library()


@register.filter
def ago(moment: datetime | None) -> str:
    """How long ago, to the second while it is recent: heartbeats come every few seconds."""
    if moment is None:
        return "never"
    seconds = int((timezone.now() - moment).total_seconds())
    if seconds < 60:
        return f"{max(seconds, 0)} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    return f"{timesince(moment)} ago"


@register.filter
def kilowatts(watts: int | None) -> str:
    """Watts as kW with one decimal, e.g. 2710 -> "2.7 kW"; "—" when not reported."""
    if watts is None:
        return "—"
    return f"{watts / 1000:.1f} kW"


@register.filter
def gigabytes(megabytes: int) -> str:
    """VRAM in GB as GPU makers count it, e.g. 81920 MB -> "80 GB"."""
    return f"{megabytes / 1024:g} GB"
