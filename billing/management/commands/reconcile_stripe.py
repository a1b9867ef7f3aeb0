"""Compare our ledger and outbox with Stripe; exit 1 when they disagree anywhere."""

import json
from datetime import timedelta

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
        parser.add_argument("--json", dest="as_json", action="store_true", help="End with a one-line JSON summary.")

    def handle(self, *args, since: int, as_json: bool, **options):
        if since <= 0:
            raise CommandError("--since must be a positive number of days.")
        start = timezone.now() - timedelta(days=since)
        drift = reconcile(since=start)
        for item in drift:
            self.stdout.write(item.line())
        if as_json:
            self.stdout.write(json.dumps(summary(drift, since=start), sort_keys=True))
        elif not drift:
            self.stdout.write(f"No drift since {start:%Y-%m-%d %H:%M} UTC.")
        if drift:
            raise CommandError(f"{len(drift)} drift(s) found.", returncode=1)
