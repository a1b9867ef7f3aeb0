from django.apps import AppConfig
from django.db.backends.signals import connection_created


class KernelConfig(AppConfig):
    name = "marketplace.kernel"
    label = "kernel"
    verbose_name = "Shared kernel"

    def ready(self) -> None:
        from marketplace.kernel.metrics import db_connection_observed

        connection_created.connect(db_connection_observed, dispatch_uid="shedshare-db-metrics")
