"""Usage, log, staging and finish reports, delivered in order and retried until the server has them."""

import logging
import time
from collections.abc import Callable
from typing import Any

from nodes.agent import logs
from nodes.agent.backoff import Backoff
from nodes.agent.client import AgentClient, AgentError
from nodes.agent.outbox import Outbox, Report

__all__ = ["Outbox", "Report", "Reporter"]
logger = logging.getLogger(__name__)


class Reporter:
    def __init__(
        self,
        client: AgentClient,
        outbox: Outbox,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
    ) -> None:
        self.outbox = outbox
        self._client = client
        self._clock = clock
        self._backoff = backoff or Backoff(base_s=1.0, cap_s=60.0)
        self._next_try_at = 0.0
        self.logs_truncated: set[str] = set()  # allocations whose logs the server stopped taking

    def usage(self, allocation_id: str, sample: dict[str, Any]) -> None:
        self.outbox.add(Report("usage", allocation_id, sample))

    def logs(self, allocation_id: str, offset: int, end: int, data: str) -> None:
        """Log text from byte `offset` to `end` of the job's log file."""
        self.outbox.add(Report("logs", allocation_id, {"offset": offset, "end": end, "data": data}))

    def finish(self, allocation_id: str, exit_code: int | None, reason: str) -> None:
        self.outbox.add(Report("finish", allocation_id, {"exit_code": exit_code, "reason": reason}))

    def staging(self, allocation_id: str, report: dict[str, Any]) -> None:
        self.outbox.add(Report("staging", allocation_id, report))

    def retry_now(self) -> None:
        self._next_try_at = 0.0
        self._backoff.success()

    def flush(self, max_calls: int = 10) -> None:
        for _ in range(max_calls):
            if not self.outbox or self._clock() < self._next_try_at:
                return
            batch = self.outbox.batch()
            try:
                self._send(batch)
            except AgentError as exc:
                if exc.retryable:
                    self._retry_later(exc)
                    return
                head = batch[0]
                logs.event(
                    logger,
                    "report_dropped",
                    logging.ERROR,
                    kind=head.kind,
                    allocation=head.allocation_id,
                    count=len(batch),
                    error=exc,
                )
            else:
                self._backoff.success()
            self.outbox.drop(len(batch))

    def _send(self, batch: list[Report]) -> None:
        head = batch[0]
        if head.kind == "finish":
            self._client.finish(head.allocation_id, **head.body)
            self.logs_truncated.discard(head.allocation_id)
            logs.event(logger, "finish_reported", allocation=head.allocation_id, **head.body)
        elif head.kind == "logs":
            self._send_logs(head)
        elif head.kind == "staging":
            self._client.staging(head.allocation_id, head.body)
            body = head.body
            logs.event(logger, "staging_reported", allocation=head.allocation_id, phase=body["phase"], ok=body["ok"])
        else:
            self._client.usage(head.allocation_id, [report.body for report in batch])
            logs.event(logger, "usage_reported", logging.DEBUG, allocation=head.allocation_id, samples=len(batch))

    def _send_logs(self, report: Report) -> None:
        answer = self._client.logs(report.allocation_id, offset=report.body["offset"], data=report.body["data"])
        if answer.get("truncated") and report.allocation_id not in self.logs_truncated:
            self.logs_truncated.add(report.allocation_id)
            logs.event(logger, "logs_truncated", logging.WARNING, allocation=report.allocation_id)

    def _retry_later(self, exc: AgentError) -> None:
        delay = self._backoff.failure(at_least=getattr(exc, "retry_after", 0.0))
        self._next_try_at = self._clock() + delay
        logs.event(
            logger, "report_failed", logging.WARNING, pending=len(self.outbox), retry_in_s=round(delay, 2), error=exc
        )
