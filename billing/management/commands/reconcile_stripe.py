"""Compare our ledger and outbox with Stripe; exit 1 when they disagree anywhere."""

import json
from datetime import UTC, date, datetime, timedelta

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from billing.reconcile import reconcile, summary


class Command(BaseCommand):
    help = (
        "Compare the ledger, the Stripe outbox and Stripe (top-ups, payouts, stuck and failed outbox "
        "rows, ledger balance). Prints one line per drift; exits 1 when there is any."
    )

    def add_arguments(self, parser):
        parser.add_argument("--since", type=int, default=30, metavar="DAYS", help="Look back this many days (30).")
        parser.add_argument(
            "--date",
            dest="day",
            metavar="YYYY-MM-DD",
            help="Look back to the start of this day (UTC) instead, to rerun a past run.",
        )
        parser.add_argument("--json", dest="as_json", action="store_true", help="End with a one-line JSON summary.")

    def handle(self, *args, since: int, day: str | None, as_json: bool, **options):
        if since <= 0:
            raise CommandError("--since must be a positive number of days.")
        start = _day_start(day) if day else timezone.now() - timedelta(days=since)
        try:
            drift = reconcile(since=start)
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        for item in drift:
            self.stdout.write(item.line())
        if as_json:
            self.stdout.write(json.dumps(summary(drift, since=start), sort_keys=True))
        elif not drift:
            self.stdout.write(f"No drift since {start:%Y-%m-%d %H:%M} UTC.")
        if drift:
            raise CommandError(f"{len(drift)} drift(s) found.", returncode=1)


def _day_start(value: str) -> datetime:
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--date takes a day as YYYY-MM-DD, not {value!r}.") from None
    if day > timezone.now().date():
        raise CommandError(f"--date {value} is in the future.")
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
