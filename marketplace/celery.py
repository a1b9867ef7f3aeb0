import contextlib
import os

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_ready
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


@task_prerun.connect
def task_log_context(task=None, task_id=None, **_) -> None:
    """Each task's log lines carry its name and id (``marketplace.kernel.logcontext``); a task
    about one job binds the job as well. Undone when the task ends."""
    from marketplace.kernel.logcontext import log_bind

    if task is not None:
        task.request.log_token = log_bind(task=f"{task.name}[{task_id}]")


@task_postrun.connect
def task_log_context_end(task=None, **_) -> None:
    from marketplace.kernel.logcontext import log_reset

    token = getattr(task.request, "log_token", None) if task is not None else None
    if token is not None:
        task.request.log_token = None
        with contextlib.suppress(ValueError):  # bound in another context (an eager task in its caller's)
            log_reset(token)


@worker_process_init.connect
def telemetry_start(**_) -> None:
    """Error reports and traces, if configured, in each worker process (after the fork)."""
    from marketplace.ops import telemetry

    telemetry.start("worker")


@worker_ready.connect
def metrics_serve(**_) -> None:
    """The host's worker metrics on METRICS_WORKER_PORT (Prometheus scrapes each worker pod
    there): the prefork children's values, summed from PROMETHEUS_MULTIPROC_DIR."""
    from django.conf import settings

    if not settings.METRICS_WORKER_PORT:
        return
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    start_http_server(settings.METRICS_WORKER_PORT, registry=registry)
