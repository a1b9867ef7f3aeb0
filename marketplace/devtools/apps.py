from django.apps import AppConfig


class DevtoolsConfig(AppConfig):
    name = "marketplace.devtools"
    label = "devtools"
    verbose_name = "Development tools"
