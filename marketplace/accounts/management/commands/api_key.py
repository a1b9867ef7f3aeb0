from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from marketplace.accounts.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a renter and print it once (it is stored only as a digest)."

    def add_arguments(self, parser):
        parser.add_argument("--user", required=True, help="The renter's username.")
        parser.add_argument("--name", default="cli", help="A label for the key.")
        parser.add_argument("--days", type=int, default=None, help="Expire after this many days.")

    def handle(self, *args, user: str, name: str, days: int | None, **options):
        renter = get_user_model().objects.filter(username=user, is_active=True).first()
        if renter is None:
            raise CommandError(f"No active user named {user!r}.")
        if days is not None and days <= 0:
            raise CommandError("--days must be a positive number of days.")
        expires_at = timezone.now() + timedelta(days=days) if days else None
        _, plaintext = api_key_create(user=renter, name=name, expires_at=expires_at)
        self.stdout.write(plaintext)
