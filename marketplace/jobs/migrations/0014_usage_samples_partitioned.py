"""Usage samples partitioned by their allocation's start on PostgreSQL (marketplace/jobs/partitions.py);
SQLite keeps the plain table. The rows are copied, in the migration's transaction."""

from django.conf import settings
from django.db import migrations
from django.utils import timezone

from marketplace.jobs import partitions


def forward(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        if not partitions.is_partitioned(cursor):
            partitions.table_partition(cursor, now=timezone.now(), ahead_weeks=settings.USAGE_PARTITIONS_AHEAD_WEEKS)


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        raise NotImplementedError("Usage samples stay partitioned: copy them into a plain table by hand to go back.")


class Migration(migrations.Migration):
    dependencies = [("jobs", "0013_usage_retention")]

    operations = [migrations.RunPython(forward, backward, elidable=False)]
