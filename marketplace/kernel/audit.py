from uuid import UUID

from marketplace.kernel.models import AuditEvent


def audit_record(action: str, subject_id: UUID, *, actor: str = "", **data) -> AuditEvent:
    """Append one audit row; call it inside the transaction that made the change."""
    return AuditEvent.objects.create(action=action, subject_id=subject_id, actor=actor, data=data)
