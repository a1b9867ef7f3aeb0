from django.db import migrations

from marketplace.kernel.appendonly import append_only


class Migration(migrations.Migration):
    dependencies = [("kernel", "0001_initial")]

    operations = [append_only("kernel_auditevent")]
