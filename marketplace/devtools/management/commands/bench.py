"""python manage.py bench <benchmark> [options]: run one benchmark from ``marketplace.bench``, print one JSON object."""

import json

from django.core.management.base import BaseCommand, CommandError

from marketplace.devtools.bench import agents, metering, offers, placement, relay, replay, retention, staging

BENCHMARKS = {
    "placement": placement,
    "replay-openb": replay,
    "metering": metering,
    "offers": offers,
    "agents": agents,
    "staging": staging,
    "relay": relay,
    "retention": retention,
}


class Command(BaseCommand):
    help = "Run a benchmark and print its result as one JSON object on stdout."

    def add_arguments(self, parser):
        subparsers = parser.add_subparsers(dest="benchmark", required=True)
        for name, module in BENCHMARKS.items():
            module.add_arguments(subparsers.add_parser(name, help=module.HELP))

    def handle(self, *args, benchmark: str, **options):
        try:
            result = BENCHMARKS[benchmark].run(**options)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(json.dumps(result))
