import json

from django.core.management.base import BaseCommand, CommandError

from marketplace.accounts.secrets import secrets_rotate
from marketplace.kernel import sealing


class Command(BaseCommand):
    help = (
        "Seal every renter's secret again with the newest of SECRETS_KEYS. Rotate a key by putting a new one "
        "first in SECRETS_KEYS, running this, then dropping the old key. Prints {resealed, unreadable}."
    )

    def handle(self, *args, **options):
        try:
            resealed, unreadable = secrets_rotate()
        except sealing.SealingUnavailable:
            raise CommandError("SECRETS_KEYS is empty: there is no key to seal with.") from None
        self.stdout.write(json.dumps({"resealed": resealed, "unreadable": unreadable}))
        if unreadable:
            raise CommandError(f"{unreadable} secret(s) no configured key opens: keep their old key in SECRETS_KEYS.")
