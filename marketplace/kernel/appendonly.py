"""Append-only tables: PostgreSQL refuses UPDATE and DELETE on them, whoever asks.

The ledger and the audit log are records of what happened; a correction is a new row. The
application never changes them, and a trigger makes that a property of the database rather
than of the code, so neither a bug, an admin edit nor a hand-written query can rewrite history.
TRUNCATE is not a row change, so test set-up and scratch databases can still be emptied.
SQLite (the embedded default) has no such trigger: its test teardown deletes rows."""

from django.db import migrations

FUNCTION = """
CREATE OR REPLACE FUNCTION shedshare_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$ LANGUAGE plpgsql
"""


def append_only(table: str) -> migrations.RunPython:
    """A migration operation that makes ``table`` append-only on PostgreSQL."""
    trigger = f"{table}_append_only"

    def forward(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(FUNCTION, params=None)
            schema_editor.execute(
                f"CREATE TRIGGER {trigger} BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION shedshare_append_only()"
            )

    def backward(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")

    return migrations.RunPython(forward, backward, elidable=False)
