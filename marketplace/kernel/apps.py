from django.apps import AppConfig


class KernelConfig(AppConfig):
    name = "marketplace.kernel"
    label = "kernel"
    verbose_name = "Shared kernel"
