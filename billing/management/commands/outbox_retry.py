"""Runbook: a Stripe outbox row failed. Once its cause is fixed, send it again."""

import uuid

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from billing.models import OutboxMessage
from billing.outbox import outbox_retry, outbox_send
from marketplace.kernel.audit import command_actor
from marketplace.kernel.errors import StateConflict


class Command(BaseCommand):
    help = (
        "Send Stripe outbox rows again, now, with their own idempotency keys: by id, or --failed for every "
        "failed row. Prints what Stripe answered; exits 1 when a row is still not sent."
    )

    def add_arguments(self, parser):
        parser.add_argument("ids", nargs="*", metavar="ID", help="Outbox row ids.")
        parser.add_argument("--failed", action="store_true", help="Every failed row.")

    def handle(self, *args, ids: list[str], failed: bool, **options):
        if bool(ids) == failed:
            raise CommandError("Name the rows to send again, or give --failed (not both).")
        if failed:
            ids = [
                str(pk)
                for pk in OutboxMessage.objects.filter(state=OutboxMessage.State.FAILED).values_list("pk", flat=True)
            ]
            if not ids:
                self.stdout.write("No outbox row has failed.")
                return
        for value in ids:
            try:
                uuid.UUID(value)
            except ValueError:
                raise CommandError(f"{value!r} is not an outbox row id.") from None
        unknown = set(ids) - {str(pk) for pk in OutboxMessage.objects.filter(pk__in=ids).values_list("pk", flat=True)}
        if unknown:
            raise CommandError(f"No outbox row has the id {', '.join(sorted(unknown))}.")
        actor, left = command_actor(), 0
        for message_id in ids:
            try:
                outbox_retry(message_id=message_id, actor=actor)
                message = outbox_send(message_id)
            except StateConflict as error:
                left += 1
                self.stdout.write(f"{message_id}: refused: {error.detail}")
                continue
            except ImproperlyConfigured as error:
                raise CommandError(str(error)) from None
            outcome = (message.stripe_id or "sent") if message.state == OutboxMessage.State.SENT else message.last_error
            left += message.state != OutboxMessage.State.SENT
            self.stdout.write(f"{message_id} {message.operation}: {message.state}: {outcome}")
        if left:
            raise CommandError(f"{left} of {len(ids)} row(s) not sent.")
