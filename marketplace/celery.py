import os

from celery import Celery
from celery.signals import task_postrun, task_prerun
from django.db import close_old_connections

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings.production")

app = Celery("shedshare")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def connections_tidy(task=None, **_) -> None:
    """Around each task, drop database connections that broke or outlived CONN_MAX_AGE, as
    Django does around each request (see CELERY_DB_REUSE_MAX). Not around a task run eagerly:
    that runs inside its caller's transaction."""
    if task is not None and not task.request.is_eager:
        close_old_connections()
