"""Publishing a task once a transaction commits, without letting the broker fail what committed.

Every task published this way is covered by a periodic sweep that finds the same work from the
database alone (queued jobs, unposted usage, unsent outbox rows, unprocessed webhook events), so
a broker that cannot take the message costs latency up to that sweep's period, never the answer
to the request that committed the work."""

import logging

from django.db import transaction

logger = logging.getLogger(__name__)


def publish_on_commit(task, *args) -> None:
    """Send ``task(*args)`` after the current transaction commits; a failed send is logged."""

    def publish() -> None:
        try:
            task.delay(*args)
        except Exception:  # the broker's to fail in many ways (refused, timed out, gone): all mean "later"
            logger.warning("task_publish_failed task=%s args=%s: its sweep does it", task.name, args, exc_info=True)

    transaction.on_commit(publish)
