"""The query parameters of GET /api/v1/jobs, parsed explicitly (django-filter is not a dependency)."""

from datetime import UTC, datetime, time

from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter
from rest_framework.exceptions import ValidationError

from marketplace.jobs.models import Job

JOB_LIST_PARAMETERS = [
    OpenApiParameter(
        "state",
        str,
        many=True,
        explode=True,
        enum=Job.State.values,
        description="Only jobs in these states; repeat the parameter or separate states with commas.",
    ),
    OpenApiParameter(
        "created_after",
        OpenApiTypes.DATETIME,
        description="Created at or after this time (ISO 8601; a date is midnight).",
    ),
    OpenApiParameter("created_before", OpenApiTypes.DATETIME, description="Created strictly before this time."),
    OpenApiParameter("name", str, description="Name contains this text (case-insensitive)."),
]


def _states(params) -> list[str]:
    states = [s.strip() for value in params.getlist("state") for s in value.split(",") if s.strip()]
    unknown = sorted(set(states) - set(Job.State.values))
    if unknown:
        raise ValidationError({"state": [f"Unknown state {', '.join(unknown)}; one of {', '.join(Job.State.values)}."]})
    return states


def _moment(params, name: str) -> datetime | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        moment = parse_datetime(raw)
        if moment is None and (day := parse_date(raw)) is not None:
            moment = datetime.combine(day, time.min)
    except ValueError:
        moment = None
    if moment is None:
        raise ValidationError({name: ["Not an ISO 8601 date or time, e.g. 2026-05-01 or 2026-05-01T12:00:00Z."]})
    try:
        # In UTC: PostgreSQL refuses offsets Python takes (beyond ±15:59).
        return (timezone.make_aware(moment) if timezone.is_naive(moment) else moment).astimezone(UTC)
    except OverflowError:
        raise ValidationError({name: ["Out of range: between years 1 and 9999 in UTC."]}) from None


def jobs_filter(jobs, params):
    """``jobs`` narrowed by the list's query parameters; a bad value is a 400 naming its parameter."""
    if states := _states(params):
        jobs = jobs.filter(state__in=states)
    if (after := _moment(params, "created_after")) is not None:
        jobs = jobs.filter(created_at__gte=after)
    if (before := _moment(params, "created_before")) is not None:
        jobs = jobs.filter(created_at__lt=before)
    if name := params.get("name", "").strip():
        if len(name) > 120 or "\x00" in name:
            raise ValidationError({"name": ["At most 120 characters, and no NUL."]})
        jobs = jobs.filter(name__icontains=name)
    return jobs
