from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("marketplace", "0003_log_chunks")]

    operations = [migrations.RenameField("job", "allowed_countries", "jurisdictions")]
