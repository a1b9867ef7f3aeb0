from django.apps import AppConfig


class ProjectConfig(AppConfig):
    """The project's own wiring, no models: it loads the Celery app when Django starts, so that
    every process (web, worker, tests) sends tasks through it rather than through a default app."""

    name = "marketplace"
    label = "project"
    verbose_name = "Shedshare"

    def ready(self) -> None:
        import marketplace.celery  # noqa: F401
