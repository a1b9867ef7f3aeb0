from celery import shared_task

from marketplace import placement

# A shallow pass, when capacity frees, looks at this many of the oldest queued jobs; the
# periodic deep pass at many more.
SHALLOW_PASS_JOBS = 20
DEEP_PASS_JOBS = 1000


@shared_task(acks_late=True)
def job_place(job_id: str) -> None:
    placement.job_place(job_id=job_id)


@shared_task(acks_late=True)
def placement_pass(limit: int = SHALLOW_PASS_JOBS) -> None:
    """Capacity may have freed: try the oldest queued jobs."""
    placement.placement_pass(limit=limit)


@shared_task
def placement_sweep() -> None:
    """The periodic deep pass that catches anything the event-driven passes missed."""
    placement.placement_pass(limit=DEEP_PASS_JOBS)
