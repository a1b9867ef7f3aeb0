"""Runbook: a job is stuck or was lost. Queue it again."""

import uuid

from django.core.management.base import BaseCommand, CommandError

from marketplace.jobs.models import Job
from marketplace.jobs.services import job_requeue
from marketplace.kernel.audit import command_actor
from marketplace.kernel.errors import StateConflict


class Command(BaseCommand):
    help = (
        "Queue a job again: one lost, one the platform stopped (residency, a drain), or one placed on a unit "
        "that has not picked it up. A starting or running job is refused (it may be running); so is a job "
        "that ended by its renter's doing."
    )

    def add_arguments(self, parser):
        parser.add_argument("job", help="The job's id.")

    def handle(self, *args, job: str, **options):
        try:
            found = Job.objects.get(pk=uuid.UUID(job))
        except (ValueError, Job.DoesNotExist):
            raise CommandError(f"No job has the id {job!r}.") from None
        previous = found.state
        try:
            requeued = job_requeue(job=found, actor=command_actor())
        except StateConflict as error:
            raise CommandError(error.detail) from None
        self.stdout.write(f"Job {requeued.pk}: {previous} -> {requeued.state}; placement asked to place it.")
