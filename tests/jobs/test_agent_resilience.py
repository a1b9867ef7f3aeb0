"""The agent survives what a shed's life throws at it, through real processes: the server going
away, the agent killed with -9, and SIGTERM. Usage arrives once, and the bill holds all the time
the job really ran, no more and no less."""

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.db.models import Sum

from billing.models import Account, LedgerEntry
from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from marketplace.jobs.models import Allocation, UsageSample
from marketplace.jobs.selectors import allocation_log_text
from marketplace.kernel.money import usage_cost_micros
from nodes.models import Unit
from nodes.services import unit_register
from tests.conftest import user_make
from tests.e2e import Renter, free_port, stack_start, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
JOB_S = 8
SLACK_MS = 1500  # start-up of the job and the loop's tick on either side of it


@dataclass
class Shed:
    stack: devstack.Stack
    port: int
    renter: Renter
    agent_argv: list[str]
    state_dir: Path

    def start_agent(self) -> None:
        self.stack.start("agent", self.agent_argv)

    def logs(self) -> str:
        return "\n".join(f"===== {name}\n{self.stack.log(name)[-3000:]}" for name in ("web", "worker", "agent"))


@pytest.fixture(params=["stream", "no-stream"])
def shed(tmp_path, request):
    """A shed whose agent holds its stream (the default), or polls over HTTP (the fallback)."""
    port = free_port()
    stack = stack_start(tmp_path, port=port)
    try:
        yield _enrolled_shed(stack, port, tmp_path / "agent", connection=request.param)
    finally:
        stack.stop_all()


def _enrolled_shed(stack: devstack.Stack, port: int, agent_dir: Path, *, connection: str = "stream") -> Shed:
    base_url = f"http://127.0.0.1:{port}"
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    unit, token = unit_register(owner=owner, name="Garden shed", country="DE")
    wallet_credit_promotional(user=renter, amount_micros=50_000_000, key="resilience-credit")
    config = str(agent_dir / "agent.json")
    enrol = devstack.agent_argv("enrol", "--url", base_url, "--token", token, "--config", config, "--country", "DE")
    enrolled = stack.run(enrol)
    assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
    argv = devstack.agent_argv(
        "run", "--config", config, "--simulate", "2xH100-80GB", "--work-dir", str(agent_dir / "work"),
        "--usage-interval", "1", "--dev-runtime", f"--{connection}",
    )  # fmt: skip
    shed = Shed(stack, port, Renter(base_url, api_key_create(user=renter, name="e2e")[1]), argv, agent_dir / "state")
    shed.start_agent()
    online = lambda: Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE and unit.gpus.count() == 2  # noqa: E731
    wait_until(online, timeout=30, what="the unit online with its GPUs")
    if connection == "stream":
        wait_until(lambda: "event=stream_connected" in stack.log("agent"), timeout=30, what="the agent's stream")
    return shed


def submit_sleep(shed: Shed, seconds: float, gpu_count: int = 2) -> str:
    # A shell, not this interpreter: an agent run as root runs jobs as nobody, who may not reach it.
    command = ["sh", "-c", f"echo started; sleep {seconds}; echo done"]
    job = shed.renter.submit(image="docker.io/library/python:3.12-slim", command=command, gpu_count=gpu_count)
    return job["id"]


def samples_of(job_id: str) -> list[tuple[int, int]]:
    return list(UsageSample.objects.filter(allocation__job_id=job_id).order_by("seq").values_list("seq", "gpu_ms"))


def wait_samples(job_id: str, count: int) -> None:
    wait_until(lambda: len(samples_of(job_id)) >= count, timeout=20, what=f"{count} usage samples of {job_id}")


def charged_micros(allocation: Allocation) -> int:
    wallet = LedgerEntry.objects.filter(transaction__allocation=allocation, account__kind=Account.Kind.RENTER_WALLET)
    return -(wallet.aggregate(total=Sum("amount_micros"))["total"] or 0)


def assert_billed_once_for_the_whole_run(job_id: str, *, gpus: int = 2) -> None:
    """Seqs 1..n with no gap, GPU time equal to the job's run time, and the ledger charging
    exactly the cost of that time."""
    allocation = Allocation.objects.get(job_id=job_id)
    samples = samples_of(job_id)
    assert [seq for seq, _ in samples] == list(range(1, len(samples) + 1))
    gpu_ms = sum(ms for _, ms in samples)
    assert gpus * JOB_S * 1000 <= gpu_ms <= gpus * (JOB_S * 1000 + SLACK_MS), samples
    due = usage_cost_micros(gpu_ms=gpu_ms, price_per_gpu_hour_micros=allocation.price_per_gpu_hour_micros)
    assert due > 0
    wait_until(lambda: charged_micros(allocation) == due, timeout=15, what=f"a charge of {due} micros")


def test_while_the_server_is_away_the_job_runs_on_and_its_usage_waits_on_disk(shed):
    job_id = submit_sleep(shed, JOB_S)
    try:
        wait_samples(job_id, 1)
        shed.stack.stop("web")
        outbox = shed.state_dir / "outbox"
        wait_until(lambda: len(list(outbox.glob("*.json"))) >= 3, timeout=10, what="usage buffered on disk")
        shed.stack.start("web", devstack.web_argv(shed.port))
        devstack.wait_http(f"http://127.0.0.1:{shed.port}/api/schema/", timeout=30)
        job = shed.renter.wait_final(job_id, timeout=30)

        assert job["state"] == "succeeded", shed.logs()
        assert_billed_once_for_the_whole_run(job_id)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{shed.logs()}") from None
    assert not list(outbox.glob("*.json"))
    assert allocation_log_text(Allocation.objects.get(job_id=job_id)) == "started\ndone\n"


def test_an_agent_killed_mid_job_adopts_it_again_and_nothing_is_counted_twice(shed):
    job_id = submit_sleep(shed, JOB_S)
    try:
        wait_samples(job_id, 2)
        shed.stack.signal("agent", signal.SIGKILL)
        shed.stack.processes["agent"].wait(timeout=5)
        time.sleep(1)  # the job runs on while no agent watches it
        shed.start_agent()
        job = shed.renter.wait_final(job_id, timeout=30)

        assert job["state"] == "succeeded", shed.logs()
        assert Allocation.objects.filter(job_id=job_id).count() == 1
        assert_billed_once_for_the_whole_run(job_id)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{shed.logs()}") from None
    assert "event=job_adopted" in shed.stack.log("agent")


def test_sigterm_drains_the_running_job_takes_no_new_one_and_exits_cleanly(shed):
    first = submit_sleep(shed, 6, gpu_count=1)
    wait_until(lambda: shed.renter.job(first)["state"] == "running", timeout=20, what="the first job running")
    signalled_at = time.monotonic()
    shed.stack.signal("agent", signal.SIGTERM)
    wait_until(lambda: "event=draining" in shed.stack.log("agent"), timeout=5, what="the agent draining")
    time.sleep(1.5)  # a long poll already on its way when the signal came may still bring work
    second = submit_sleep(shed, 1, gpu_count=1)

    code = shed.stack.processes["agent"].wait(timeout=30)

    assert code == 0, shed.logs()
    assert time.monotonic() - signalled_at >= 4
    assert shed.renter.job(first)["state"] == "succeeded"
    assert shed.renter.job(second)["state"] in ("queued", "placed"), shed.logs()
    assert not Allocation.objects.filter(job_id=second, acknowledged_at__isnull=False).exists()
