from django.conf import settings
from django.db import models
from django.utils import timezone


class AuditEvent(models.Model):
    """An append-only record of every change of capacity, state or money."""

    action = models.CharField(max_length=60, db_index=True)
    subject_id = models.UUIDField(db_index=True)
    actor = models.CharField(max_length=80, blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.action} {self.subject_id}"


class IdempotencyRecord(models.Model):
    """The stored answer to a POST made with an ``Idempotency-Key``; a retry gets it back.

    The unique constraint is what makes two concurrent requests with one key create one thing:
    the second insert waits for the first transaction and then fails."""

    id = models.BigAutoField(primary_key=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    endpoint = models.CharField(max_length=300)  # "POST /api/v1/jobs"
    request_hash = models.CharField(max_length=64)
    response_status = models.PositiveSmallIntegerField()
    response_body = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key", "endpoint"], name="idempotency_record_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.key}"
