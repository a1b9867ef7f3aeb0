"""Runbook: a drained shed is fixed. Let it take work again."""

from django.core.management.base import BaseCommand, CommandError

from marketplace.kernel.audit import command_actor
from nodes.management.lookup import unit_named
from nodes.services import unit_resume


class Command(BaseCommand):
    help = "Let a drained unit (by id, or by name when only one unit has it) take new work again."

    def add_arguments(self, parser):
        parser.add_argument("unit", help="The unit's id, or its name.")

    def handle(self, *args, unit: str, **options):
        found = unit_named(unit)
        if not found.drain_requested:
            raise CommandError(f"Unit {found.name} is not draining ({found.get_status_display().lower()}).")
        resumed = unit_resume(unit=found, actor=command_actor())
        self.stdout.write(f"Unit {resumed.name} ({resumed.pk}) is {resumed.get_status_display().lower()}.")
