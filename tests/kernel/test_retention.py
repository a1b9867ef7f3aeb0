"""Audit events past RETENTION_AUDIT_DAYS are archived to gzip JSON lines, then deleted, through
the one path the append-only table allows."""

import gzip
import json
import uuid
from datetime import timedelta

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from marketplace.kernel import retention, tasks
from marketplace.kernel.models import AuditEvent

pytestmark = pytest.mark.django_db

NOW = timezone.now()


@pytest.fixture
def archive(tmp_path, settings):
    settings.RETENTION_ARCHIVE_DIR = tmp_path
    settings.RETENTION_AUDIT_DAYS = 30
    return tmp_path / "audit"


def audited(action: str, *, days_ago: int) -> AuditEvent:
    return AuditEvent.objects.create(
        action=action, subject_id=uuid.uuid4(), actor="test", data={"n": days_ago},
        created_at=NOW - timedelta(days=days_ago),
    )  # fmt: skip


def archived_rows(folder) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as lines:
            rows += [json.loads(line) for line in lines]
    return rows


def test_old_events_are_archived_then_deleted_and_recent_ones_stay(archive, settings):
    settings.RETENTION_BATCH = 2
    old = [audited("job.placed", days_ago=90 - n) for n in range(3)]
    recent = audited("job.placed", days_ago=3)

    assert retention.audit_events_archive(now=NOW) == 3

    assert list(AuditEvent.objects.values_list("pk", flat=True)) == [recent.pk]
    rows = archived_rows(archive)
    assert [row["id"] for row in rows] == [event.pk for event in old]
    assert rows[0]["subject_id"] == str(old[0].subject_id) and rows[0]["data"] == {"n": 90}
    assert len(list(archive.glob("*.jsonl.gz"))) == 2  # a file a batch
    assert not list(archive.glob("*.partial"))


def test_archiving_again_after_a_crash_writes_the_same_file(archive):
    audited("job.placed", days_ago=60)
    rows = list(AuditEvent.objects.values(*retention.FIELDS))
    first = retention._archive_write(rows)

    assert retention.audit_events_archive(now=NOW) == 1
    assert list(archive.glob("*.jsonl.gz")) == [first]
    assert len(archived_rows(archive)) == 1


def test_the_hourly_task_archives_what_is_due(archive):
    audited("job.placed", days_ago=60)

    assert tasks.audit_events_archive() == 1


@pytest.mark.pg
def test_the_audit_table_still_refuses_changes_outside_the_archive():
    event = audited("job.placed", days_ago=60)
    with pytest.raises(DatabaseError), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).delete()
    with pytest.raises(DatabaseError), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(action="job.erased")
    # Saying rows are archived up to a time allows deleting only older ones.
    with pytest.raises(DatabaseError), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('shedshare.audit_archived_before', %s, true)",
                [(NOW - timedelta(days=90)).isoformat()],
            )
        AuditEvent.objects.filter(pk=event.pk).delete()
    assert AuditEvent.objects.filter(pk=event.pk).exists()
