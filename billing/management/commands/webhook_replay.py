"""Runbook: a Stripe webhook event needs a person. Once its cause is fixed, replay it."""

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from billing.models import WebhookEvent
from billing.webhooks import webhook_replay
from marketplace.kernel.audit import command_actor


class Command(BaseCommand):
    help = (
        "Process stored Stripe events again, now, as the webhook endpoint does: by event id (evt_...), or "
        "--needs-person for every event given up on. A replay re-reads Stripe and never credits twice. "
        "Exits 1 when an event is still not processed."
    )

    def add_arguments(self, parser):
        parser.add_argument("event_ids", nargs="*", metavar="EVENT_ID", help="Stripe event ids (evt_...).")
        parser.add_argument("--needs-person", action="store_true", help="Every event that needs a person.")

    def handle(self, *args, event_ids: list[str], needs_person: bool, **options):
        if bool(event_ids) == needs_person:
            raise CommandError("Name the events to replay, or give --needs-person (not both).")
        if needs_person:
            event_ids = list(
                WebhookEvent.objects.filter(failed_at__isnull=False)
                .order_by("received_at")
                .values_list("event_id", flat=True)
            )
            if not event_ids:
                self.stdout.write("No event needs a person.")
                return
        unknown = set(event_ids) - set(
            WebhookEvent.objects.filter(event_id__in=event_ids).values_list("event_id", flat=True)
        )
        if unknown:
            raise CommandError(f"No stored event has the id {', '.join(sorted(unknown))}.")
        actor, left = command_actor(), 0
        for event_id in event_ids:
            try:
                event = webhook_replay(event_id=event_id, actor=actor)
            except ImproperlyConfigured as error:
                raise CommandError(str(error)) from None
            if event.processed_at is not None:
                self.stdout.write(f"{event_id} {event.type}: processed")
            else:
                left += 1
                state = "needs a person" if event.failed_at else "waiting (the sweep retries it)"
                self.stdout.write(f"{event_id} {event.type}: {state}: {event.last_error}")
        if left:
            raise CommandError(f"{left} of {len(event_ids)} event(s) not processed.")
