"""The audit table stays append-only, except that a transaction which has said up to when rows
are archived may delete rows older than that (marketplace/kernel/retention.py)."""

from django.db import migrations

TABLE = "kernel_auditevent"
FUNCTION = """
CREATE OR REPLACE FUNCTION shedshare_audit_append_only() RETURNS trigger AS $$
DECLARE
    archived_before text := current_setting('shedshare.audit_archived_before', true);
BEGIN
    IF TG_OP = 'DELETE' AND archived_before IS NOT NULL AND archived_before <> ''
            AND OLD.created_at < archived_before::timestamptz THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$ LANGUAGE plpgsql
"""


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FUNCTION, params=None)
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {TABLE}_append_only ON {TABLE}")
        schema_editor.execute(
            f"CREATE TRIGGER {TABLE}_append_only BEFORE UPDATE OR DELETE ON {TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION shedshare_audit_append_only()"
        )


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {TABLE}_append_only ON {TABLE}")
        schema_editor.execute(
            f"CREATE TRIGGER {TABLE}_append_only BEFORE UPDATE OR DELETE ON {TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION shedshare_append_only()"
        )
        schema_editor.execute("DROP FUNCTION IF EXISTS shedshare_audit_append_only()")


class Migration(migrations.Migration):
    dependencies = [("kernel", "0002_audit_append_only")]

    operations = [migrations.RunPython(forward, backward, elidable=False)]
