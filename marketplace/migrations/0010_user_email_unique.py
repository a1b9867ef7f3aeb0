"""One account per email address, whatever its case: sign-up and the profile check it first, and
this index makes two sign-ups at the same moment unable to both succeed. Blank emails (accounts
made by operators or tests) are not constrained."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("marketplace", "0009_offer_snapshot"),
    ]

    operations = [
        migrations.RunSQL(
            "CREATE UNIQUE INDEX user_email_unique_ci ON auth_user (LOWER(email)) WHERE email <> ''",
            reverse_sql="DROP INDEX user_email_unique_ci",
        ),
    ]
