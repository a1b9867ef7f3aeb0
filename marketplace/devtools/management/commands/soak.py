"""python manage.py soak [--minutes M] [--rate R]: the demo under load; prints one JSON object."""

import json

from django.core.management.base import BaseCommand, CommandError

from marketplace.devtools import soak


class Command(BaseCommand):
    help = soak.HELP

    def add_arguments(self, parser):
        soak.add_arguments(parser)

    def handle(self, *args, **options):
        try:
            result = soak.run(**options)
        except (ValueError, RuntimeError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(json.dumps(result))
        if not result["ok"]:
            raise CommandError("The soak found a fault; see the JSON above.")
