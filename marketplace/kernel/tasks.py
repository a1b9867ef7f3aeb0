"""Publishing a task once a transaction commits, without letting the broker fail what committed.

Every task published this way is covered by a periodic sweep that finds the same work from the
database alone (queued jobs, unposted usage, unsent outbox rows, unprocessed webhook events), so
a broker that cannot take the message costs latency up to that sweep's period, never the answer
to the request that committed the work. Also the kernel's own periodic task: the audit archive."""

import logging
import time

from celery import shared_task
from django.conf import settings
from django.db import transaction

from marketplace.kernel.metrics import RETENTION_LAST_RUN

logger = logging.getLogger(__name__)


def publish_on_commit(task, *args) -> None:
    """Send ``task(*args)`` after the current transaction commits; a failed send is logged."""

    def publish() -> None:
        try:
            task.delay(*args)
        except Exception:  # the broker's to fail in many ways (refused, timed out, gone): all mean "later"
            logger.warning("task_publish_failed task=%s args=%s: its sweep does it", task.name, args, exc_info=True)

    transaction.on_commit(publish)


@shared_task
def audit_events_archive() -> int:
    """Hourly: audit events older than RETENTION_AUDIT_DAYS archived to files, then deleted,
    within RETENTION_RUN_BUDGET_S."""
    from marketplace.kernel import retention

    archived = retention.audit_events_archive(budget=retention.Budget(settings.RETENTION_RUN_BUDGET_S))
    RETENTION_LAST_RUN.labels(task="audit_events_archive").set(time.time())
    return archived
