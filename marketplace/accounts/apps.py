from django.apps import AppConfig
from django.core import checks


class AccountsConfig(AppConfig):
    name = "marketplace.accounts"
    label = "accounts"
    verbose_name = "Accounts"

    def ready(self) -> None:
        checks.register(secrets_keys_check)


def secrets_keys_check(app_configs, **kwargs) -> list:
    """SECRETS_KEYS must hold valid Fernet keys; a deployment without any stores no secrets."""
    from django.conf import settings

    from marketplace.kernel import sealing

    bad = [n for n, key in enumerate(settings.SECRETS_KEYS, start=1) if not sealing.key_valid(key)]
    if bad:
        return [
            checks.Error(
                f"SECRETS_KEYS: key {bad[0]} is not a Fernet key (32 bytes, URL-safe base64).",
                hint='Make one with: python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"',
                id="shedshare.E010",
            )
        ]
    if not settings.SECRETS_KEYS and not settings.DEBUG:
        return [
            checks.Warning(
                "SECRETS_KEYS is empty: renters cannot store secrets, nor run jobs that name them.",
                hint="Set SECRETS_KEYS to one or more Fernet keys, newest first.",
                id="shedshare.W010",
            )
        ]
    return []
