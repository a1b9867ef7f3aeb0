import django.db.models.deletion
from django.db import migrations, models

# Existing samples take their allocation's start (the partition key of 0014).
STARTED_FILL = (
    "UPDATE jobs_usagesample SET allocation_started_at = "
    "(SELECT created_at FROM jobs_allocation WHERE jobs_allocation.id = jobs_usagesample.allocation_id)"
)


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0012_relay_location"),
        ("nodes", "0006_relay_location"),
    ]

    operations = [
        migrations.AddField(
            model_name="allocation",
            name="usage_rolled_up_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="allocation",
            index=models.Index(
                condition=models.Q(("usage_rolled_up_at__isnull", True)),
                fields=["released_at"],
                name="allocation_not_rolled_up",
            ),
        ),
        migrations.AddConstraint(
            model_name="allocation",
            constraint=models.UniqueConstraint(fields=("id", "created_at"), name="allocation_id_started"),
        ),
        migrations.AddField(
            model_name="usagesample",
            name="allocation_started_at",
            field=models.DateTimeField(null=True, help_text="The allocation's created_at: the partition key."),
        ),
        migrations.RunSQL(STARTED_FILL, migrations.RunSQL.noop, elidable=False),
        migrations.AlterField(
            model_name="usagesample",
            name="allocation_started_at",
            field=models.DateTimeField(help_text="The allocation's created_at: the partition key."),
        ),
        migrations.CreateModel(
            name="UsageHour",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("hour", models.DateTimeField(help_text="The start of the UTC hour the samples were recorded in.")),
                ("samples", models.PositiveIntegerField()),
                ("gpu_ms", models.BigIntegerField()),
                ("billable_gpu_ms", models.BigIntegerField()),
                ("first_seq", models.PositiveIntegerField()),
                ("last_seq", models.PositiveIntegerField()),
                ("first_recorded_at", models.DateTimeField()),
                ("last_recorded_at", models.DateTimeField()),
                (
                    "allocation",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT, related_name="usage_hours", to="jobs.allocation"
                    ),
                ),
            ],
            options={
                "ordering": ["allocation", "hour"],
                "indexes": [models.Index(fields=["hour"], name="usage_hour_hour")],
                "constraints": [
                    models.UniqueConstraint(fields=("allocation", "hour"), name="usage_hour_unique"),
                    models.CheckConstraint(
                        condition=models.Q(("billable_gpu_ms__gte", 0), ("billable_gpu_ms__lte", models.F("gpu_ms"))),
                        name="usage_hour_billable_within",
                    ),
                ],
            },
        ),
    ]
