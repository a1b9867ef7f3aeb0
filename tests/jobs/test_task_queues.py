"""Placement, billing and everything else on queues of their own, so that each kind of worker can
be scaled alone (README "Kubernetes"), while a worker started without -Q still takes them all."""

from types import SimpleNamespace

import pytest
from django.core.exceptions import ImproperlyConfigured

from billing import tasks as billing_tasks
from marketplace.celery import app
from marketplace.jobs import placement
from marketplace.jobs import tasks as job_tasks
from marketplace.kernel.env import env_ordinal
from nodes import tasks as node_tasks

TASK_MODULES = (job_tasks, billing_tasks, node_tasks)


def queue_of(task_name: str) -> str:
    return app.amqp.router.route({}, task_name)["queue"].name


@pytest.mark.parametrize(
    ("task", "queue"),
    [
        ("marketplace.jobs.tasks.job_place", "placement"),
        ("marketplace.jobs.tasks.placement_pass", "placement"),
        ("marketplace.jobs.tasks.placement_sweep", "placement"),
        ("billing.tasks.outbox_send", "billing"),
        ("billing.tasks.webhook_process", "billing"),
        ("billing.tasks.payouts_run", "billing"),
        ("billing.tasks.stripe_reconcile", "billing"),
        # Usage rating stops jobs at the wallet's floor: it must not wait behind Stripe's calls.
        ("billing.tasks.usage_post", "celery"),
        ("billing.tasks.usage_rate_sweep", "celery"),
        ("nodes.tasks.unit_liveness_sweep", "celery"),
        ("marketplace.jobs.tasks.offer_snapshots_refresh", "celery"),
    ],
)
def test_each_task_goes_to_its_queue(task, queue):
    assert queue_of(task) == queue


def test_every_routed_task_exists_and_every_task_has_a_declared_queue():
    declared = {queue.name for queue in app.conf.task_queues}
    registered = {task.name for module in TASK_MODULES for task in vars(module).values() if hasattr(task, "delay")}

    assert set(app.conf.task_routes) <= registered
    assert {queue_of(name) for name in registered} == declared == {"celery", "placement", "billing"}


def test_each_queue_has_an_exchange_of_its_own_so_no_task_is_delivered_twice():
    bindings = [(queue.exchange.name, queue.routing_key) for queue in app.conf.task_queues]
    assert len(set(bindings)) == len(bindings)


def test_a_worker_started_without_a_queue_list_takes_every_queue():
    assert set(app.amqp.queues.consume_from) == {"celery", "placement", "billing"}


def consuming(monkeypatch, *queues) -> list:
    monkeypatch.setattr(
        job_tasks, "current_app", SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from=queues)))
    )
    built = []
    monkeypatch.setattr(placement, "engine", lambda: built.append(True) or SimpleNamespace(view=SimpleNamespace(
        refresh=lambda: None, units=())))  # fmt: skip
    return built


def test_only_a_worker_that_takes_the_placement_queue_builds_a_capacity_view(monkeypatch):
    built = consuming(monkeypatch, "celery", "billing")
    job_tasks.placement_view_build()
    assert built == []

    built = consuming(monkeypatch, "placement")
    job_tasks.placement_view_build()
    assert built == [True]


def test_a_placement_worker_pod_takes_the_shards_after_those_of_the_pods_before_it(settings):
    # Pod 2 of a StatefulSet of workers with two processes each: shards 4 and 5 of 6.
    settings.PLACEMENT_SHARDS = 6
    settings.PLACEMENT_SHARD_FIRST = 4
    placement.engine_reset()
    try:
        engine = placement.engine()  # this process is no pool's child: its index counts as 0
        assert (engine.shard, engine.view.shards) == (4, 6)
    finally:
        placement.engine_reset()


@pytest.mark.parametrize(("raw", "ordinal"), [("3", 3), ("shedshare-placement-12", 12)])
def test_a_placement_worker_is_numbered_by_its_pod_name(monkeypatch, raw, ordinal):
    monkeypatch.setenv("PLACEMENT_WORKER", raw)
    assert env_ordinal("PLACEMENT_WORKER", 0) == ordinal


@pytest.mark.parametrize("raw", ["shedshare-placement", "placement-2a", "-"])
def test_a_worker_name_without_an_ordinal_is_refused(monkeypatch, raw):
    monkeypatch.setenv("PLACEMENT_WORKER", raw)
    with pytest.raises(ImproperlyConfigured, match="PLACEMENT_WORKER"):
        env_ordinal("PLACEMENT_WORKER", 0)
