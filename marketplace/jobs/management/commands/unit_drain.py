"""Runbook: a shed misbehaves. Drain it (no new work), and stop its jobs or let them finish."""

from django.core.management.base import BaseCommand, CommandError

from marketplace.jobs.services import unit_jobs_stop
from marketplace.kernel.audit import command_actor
from marketplace.kernel.errors import StateConflict
from nodes.management.lookup import unit_named
from nodes.services import unit_drain


class Command(BaseCommand):
    help = (
        "Drain a unit (by id, or by name when only one unit has it): placement sends it no new work. "
        "--let-finish (the default) lets its jobs run to their end; --stop-jobs stops them too, queuing "
        "each again (a job that started and is not restartable fails instead)."
    )

    def add_arguments(self, parser):
        parser.add_argument("unit", help="The unit's id, or its name.")
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--stop-jobs", action="store_true", help="Stop the jobs running on it as well.")
        mode.add_argument("--let-finish", action="store_true", help="Let its jobs finish (the default).")

    def handle(self, *args, unit: str, stop_jobs: bool, **options):
        actor = command_actor()
        try:
            drained = unit_drain(unit=unit_named(unit), actor=actor)
        except StateConflict as error:
            raise CommandError(error.detail) from None
        self.stdout.write(f"Unit {drained.name} ({drained.pk}) is {drained.get_status_display().lower()}.")
        if not stop_jobs:
            self.stdout.write("Its running jobs go on to their end.")
            return
        stopped = unit_jobs_stop(unit=drained, actor=actor)
        for job in stopped:
            self.stdout.write(f"job {job.pk}: {job.state}")
        self.stdout.write(
            f"Stopped {len(stopped)} job(s); those still running are queued again once the agent stops them."
        )
