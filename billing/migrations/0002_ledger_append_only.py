from django.db import migrations

from marketplace.kernel.appendonly import append_only


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial"), ("kernel", "0002_audit_append_only")]

    operations = [append_only("billing_ledgertransaction"), append_only("billing_ledgerentry")]
