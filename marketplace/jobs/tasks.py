import logging
import time

from celery import current_app, shared_task
from celery.signals import worker_process_init

from marketplace.jobs import placement

log = logging.getLogger(__name__)

# A shallow pass, when capacity frees, looks at this many of the oldest queued jobs; the
# periodic deep pass at many more.
SHALLOW_PASS_JOBS = 20
DEEP_PASS_JOBS = 1000
# The queue the placement tasks are routed to (CELERY_TASK_ROUTES).
PLACEMENT_QUEUE = "placement"


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


@shared_task
def idempotency_records_prune() -> int:
    """Idempotency keys are kept a day (see marketplace.kernel.api.idempotency); older ones go."""
    from marketplace.kernel.api.idempotency import idempotency_records_prune as prune

    return prune()


@shared_task
def offer_snapshots_refresh() -> int:
    """Keep offer snapshots warm, so a search after a burst of placements seldom recomputes many."""
    from marketplace.jobs.offers import snapshots_refresh

    return snapshots_refresh()


@worker_process_init.connect
def placement_view_build(**_) -> None:
    """Build the process's capacity view before it takes its first task, so the first submits
    it serves do not wait seconds for it (CELERY_WORKER_PROC_ALIVE_TIMEOUT allows for this).
    Only in a worker that takes the placement queue (CELERY_TASK_ROUTES): one started for the
    other queues alone never places, and would hold a view of every unit for nothing."""
    if PLACEMENT_QUEUE not in current_app.amqp.queues.consume_from:
        return
    started = time.perf_counter()
    try:
        view = placement.engine().view
        view.refresh()
        log.info("Capacity view built: %d units in %.1f s.", len(view.units), time.perf_counter() - started)
    except Exception:  # noqa: BLE001 - the first task builds it instead
        log.warning("The capacity view could not be built at start; the first task will.", exc_info=True)
