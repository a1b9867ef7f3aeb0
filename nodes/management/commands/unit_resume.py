"""Runbook: a drained shed is fixed. Let it take work again."""

from django.core.management.base import BaseCommand, CommandError

from marketplace.kernel.audit import command_actor
from nodes.selectors import units_named
from nodes.services import unit_resume


class Command(BaseCommand):
    help = "Let a drained unit (by id, or by name when only one unit has it) take new work again."

    def add_arguments(self, parser):
        parser.add_argument("unit", help="The unit's id, or its name.")

    def handle(self, *args, unit: str, **options):
        found = list(units_named(unit))
        if len(found) != 1:
            raise CommandError(
                f"No unit has the id or name {unit!r}."
                if not found
                else f"{len(found)} units are named {unit!r}: "
                f"name one by its id ({', '.join(str(u.pk) for u in found)})."
            )
        if not found[0].drain_requested:
            raise CommandError(f"Unit {found[0].name} is not draining ({found[0].get_status_display().lower()}).")
        resumed = unit_resume(unit=found[0], actor=command_actor())
        self.stdout.write(f"Unit {resumed.name} ({resumed.pk}) is {resumed.get_status_display().lower()}.")
