import logging
import time

from celery import current_app, shared_task
from celery.signals import worker_process_init
from django.conf import settings

from marketplace.jobs import placement
from marketplace.kernel.logcontext import log_context
from marketplace.kernel.metrics import RETENTION_LAST_RUN
from marketplace.kernel.retention import Budget

log = logging.getLogger(__name__)

# A shallow pass, when capacity frees, looks at this many of the oldest queued jobs; the
# periodic deep pass at many more.
SHALLOW_PASS_JOBS = 20
DEEP_PASS_JOBS = 1000
# The queue the placement tasks are routed to (CELERY_TASK_ROUTES).
PLACEMENT_QUEUE = "placement"


@shared_task(acks_late=True)
def job_place(job_id: str) -> None:
    with log_context(job=job_id):
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
def usage_samples_roll_up() -> dict:
    """Hourly: usage past the dispute window rolled up by the hour, then the samples it replaced
    deleted, within RETENTION_RUN_BUDGET_S; what is left waits for the next run."""
    from marketplace.jobs import retention

    budget = Budget(settings.RETENTION_RUN_BUDGET_S)
    done = retention.usage_samples_roll_up(budget=budget)
    done["deleted"] = retention.usage_samples_prune(budget=budget)
    RETENTION_LAST_RUN.labels(task="usage_samples_roll_up").set(time.time())
    return done


@shared_task
def usage_partitions_maintain() -> dict:
    """Daily (PostgreSQL): usage partitions made ahead, and those wholly rolled up dropped."""
    from marketplace.jobs import retention

    result = retention.usage_partitions_maintain()
    RETENTION_LAST_RUN.labels(task="usage_partitions_maintain").set(time.time())
    return result


@shared_task
def log_chunks_prune() -> int:
    """Hourly: jobs' logs go RETENTION_LOG_DAYS after their allocation ended."""
    from marketplace.jobs import retention

    deleted = retention.log_chunks_prune(budget=Budget(settings.RETENTION_RUN_BUDGET_S))
    RETENTION_LAST_RUN.labels(task="log_chunks_prune").set(time.time())
    return deleted


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
