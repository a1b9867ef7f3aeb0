"""The whole marketplace loop through real processes: web server, Celery worker, node agent."""

import pytest
from django.db.models import Sum

from billing.models import Account, LedgerEntry, LedgerTransaction
from billing.selectors import wallet_balance_micros
from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from marketplace.jobs.models import Allocation
from marketplace.kernel.models import AuditEvent
from nodes.models import Unit
from nodes.services import unit_register
from tests.conftest import user_make
from tests.e2e import Renter, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def dump_logs(stack) -> str:
    return "\n".join(f"===== {name}\n{stack.log(name)[-4000:]}" for name in ("web", "worker", "agent"))


def test_a_job_travels_from_submit_to_the_bill(running_stack, tmp_path):
    stack = running_stack
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    unit, token = unit_register(owner=owner, name="Garden shed", country="DE")
    wallet_credit_promotional(user=renter, amount_micros=50_000_000, key="e2e-credit")
    _, api_key = api_key_create(user=renter, name="e2e")
    config = str(tmp_path / "agent" / "agent.json")

    enrolled = stack.run(
        devstack.agent_argv("enrol", "--url", stack.base_url, "--token", token, "--config", config, "--country", "DE")
    )
    assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
    stack.start(
        "agent",
        devstack.agent_argv(
            "run", "--config", config, "--simulate", "2xH100-80GB",
            "--work-dir", str(tmp_path / "agent" / "work"), "--usage-interval", "1", "--dev-runtime",
        ),
    )  # fmt: skip
    try:
        wait_until(
            lambda: Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE, timeout=30, what="the unit online"
        )
        assert unit.gpus.count() == 2

        shopper = Renter(stack.base_url, api_key)
        ok = shopper.submit(
            image="docker.io/library/python:3.12-slim",
            # A shell, not this interpreter: an agent run as root runs jobs as nobody, who may not
            # be able to reach a Python installed in root's home.
            command=["sh", "-c", "echo 'hello from a shed'; sleep 3"],
            gpu_count=2,
            jurisdictions=["DE"],
            max_price_per_gpu_hour="5.00",
        )
        failing = shopper.submit(
            image="docker.io/library/python:3.12-slim",
            command=["sh", "-c", "exit 3"],
            jurisdictions=["DE", "FR"],
        )
        ok, failing = shopper.wait_final(ok["id"]), shopper.wait_final(failing["id"])
    except AssertionError as error:
        raise AssertionError(f"{error}\n{dump_logs(stack)}") from None

    assert ok["state"] == "succeeded", dump_logs(stack)
    assert ok["exit_code"] == 0
    assert ok["placement"]["unit_id"] == str(unit.pk)
    assert ok["placement"]["gpu_count"] == 2
    assert failing["state"] == "failed"
    assert failing["exit_code"] == 3

    # Usage: two GPUs for at least the three seconds the job slept, charged at the unit's price.
    allocation = Allocation.objects.get(job_id=ok["id"])
    used_ms = allocation.usage_samples.aggregate(total=Sum("gpu_ms"))["total"]
    assert used_ms >= 2 * 3000
    expected = used_ms * allocation.price_per_gpu_hour_micros // 3_600_000

    def fully_charged():
        # The worker posts usage shortly after it arrives; wait for the last posting.
        job = shopper.job(ok["id"])
        return job if round(float(job["usage"]["cost"]) * 1_000_000) == expected else None

    charged = wait_until(fully_charged, timeout=15, what="the usage charge")
    assert charged["usage"]["gpu_seconds"] == used_ms / 1000
    assert LedgerTransaction.objects.filter(allocation=allocation, kind="usage").exists()
    assert LedgerEntry.objects.aggregate(total=Sum("amount_micros"))["total"] == 0
    assert wallet_balance_micros(renter) < 50_000_000
    owner_payable = LedgerEntry.objects.filter(account__kind=Account.Kind.OWNER_PAYABLE, account__user=owner)
    assert owner_payable.aggregate(total=Sum("amount_micros"))["total"] > 0

    # The leases are free again and the story is in the audit trail.
    assert not allocation.leases.filter(released_at__isnull=True).exists()
    actions = list(AuditEvent.objects.filter(subject_id=ok["id"]).values_list("action", flat=True))
    for step in ("job.submitted", "job.placed", "allocation.acknowledged", "job.started", "job.succeeded"):
        assert step in actions
