import getpass
from collections.abc import Iterable
from uuid import UUID

from marketplace.kernel.models import AuditEvent


def audit_record(action: str, subject_id: UUID, *, actor: str = "", **data) -> AuditEvent:
    """Append one audit row; call it inside the transaction that made the change."""
    return AuditEvent.objects.create(action=action, subject_id=subject_id, actor=actor, data=data)


def audit_records(rows: Iterable[tuple[str, UUID, dict]], *, actor: str = "") -> list[AuditEvent]:
    """Append many audit rows, (action, subject id, data) each, in one insert."""
    return AuditEvent.objects.bulk_create(
        [AuditEvent(action=action, subject_id=subject_id, actor=actor, data=data) for action, subject_id, data in rows]
    )


def command_actor() -> str:
    """The actor of a change made by a management command: the operator's login on the host."""
    try:
        return f"operator:{getpass.getuser()}"[:80]
    except (KeyError, OSError):  # no name for the uid (a container without a passwd entry)
        return "operator:unknown"
