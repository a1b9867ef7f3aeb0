"""The whole marketplace loop through real processes: web server, Celery worker, node agent; the
agent over its stream (the default) and over HTTP polling (its fallback)."""

import time

import httpx
import pytest
from django.db.models import Sum
from prometheus_client.parser import text_string_to_metric_families

from billing.models import Account, LedgerEntry, LedgerTransaction
from billing.selectors import wallet_balance_micros
from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from marketplace.jobs.job_reads import job_log_read
from marketplace.jobs.models import Allocation, Job
from marketplace.kernel.models import AuditEvent
from nodes.models import Unit
from nodes.services import unit_register
from tests.conftest import user_make
from tests.e2e import Renter, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def dump_logs(stack) -> str:
    return "\n".join(f"===== {name}\n{stack.log(name)[-4000:]}" for name in ("web", "worker", "agent"))


def agent_start(stack, tmp_path, *, connection: str, url: str | None = None):
    """A renter with credit and an API key, and a shed's agent in Germany, online; its agent
    talks to ``url`` (by default the stack's web server)."""
    url = url or stack.base_url
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    unit, token = unit_register(owner=owner, name="Garden shed", country="DE")
    wallet_credit_promotional(user=renter, amount_micros=50_000_000, key="e2e-credit")
    _, api_key = api_key_create(user=renter, name="e2e")
    config = str(tmp_path / "agent" / "agent.json")

    enrolled = stack.run(
        devstack.agent_argv("enrol", "--url", url, "--token", token, "--config", config, "--country", "DE")
    )
    assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
    stack.start(
        "agent",
        devstack.agent_argv(
            "run", "--config", config, "--simulate", "2xH100-80GB", f"--{connection}",
            "--work-dir", str(tmp_path / "agent" / "work"), "--usage-interval", "1", "--dev-runtime",
        ),
    )  # fmt: skip
    try:
        wait_until(
            lambda: Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE, timeout=30, what="the unit online"
        )
        if connection == "stream":
            wait_until(lambda: "event=stream_connected" in stack.log("agent"), timeout=30, what="the stream")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{dump_logs(stack)}") from None
    return owner, renter, unit, Renter(stack.base_url, api_key)


@pytest.mark.parametrize("connection", ["stream", "no-stream"])
def test_a_job_travels_from_submit_to_the_bill(running_stack, tmp_path, connection):
    stack = running_stack
    owner, renter, unit, shopper = agent_start(stack, tmp_path, connection=connection)
    try:
        assert unit.gpus.count() == 2
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
    # Over the stream the work was pushed: the agent never polled. Without it, it polled.
    polls = stack.log("web").count("/api/agent/v1/assignments/next")
    assert (polls == 0) if connection == "stream" else (polls > 0), polls

    # The operator's view of the same run (/metrics sums the web and worker processes).
    scraped = metrics_scrape(stack.base_url)
    assert scraped[("shedshare_placements_total", ())] == 2
    # Two placement tasks may race for the same slices (the loser tries again): exported, not always 0.
    assert ("shedshare_placement_lost_races_total", ()) in scraped
    for state in ("queued", "placed", "starting", "running"):
        assert scraped[("shedshare_jobs", (("state", state),))] == 0
    assert scraped[("shedshare_units", (("status", "online"),))] == 1
    assert scraped[("shedshare_scrape_errors", (("app", "billing"),))] == 0
    submits = ("shedshare_http_requests_total", (("method", "POST"), ("route", "api/v1/jobs"), ("status", "2xx")))
    assert scraped[submits] == 2
    assert scraped[("shedshare_db_query_duration_seconds_count", (("alias", "default"),))] > 0
    if connection == "stream":
        assert scraped[("shedshare_assignment_push_seconds_count", ())] == 2
        assert scraped[("shedshare_units_connected", ())] == 1
        over_stream = sum(value for (name, labels), value in scraped.items()
                          if name == "shedshare_heartbeats_total" and ("path", "stream") in labels)  # fmt: skip
        assert over_stream > 0
    else:
        assert scraped[("shedshare_heartbeats_total", (("kind", "full"), ("path", "http")))] > 0


def metrics_scrape(base_url: str) -> dict:
    """/metrics as {(sample name, sorted labels): value}."""
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_a_cancel_reaches_the_job_within_a_second_and_billing_stops_with_it(running_stack, tmp_path):
    stack = running_stack
    _, _, unit, shopper = agent_start(stack, tmp_path, connection="stream")
    # The job says when its SIGTERM came (the wall clock this machine shares with the test).
    script = "trap 'echo TERM-AT $(date +%s.%N); exit 143' TERM; echo ready; while :; do sleep 0.05; done"
    job = shopper.submit(image="docker.io/library/python:3.12-slim", command=["sh", "-c", script],
                         jurisdictions=["DE"])  # fmt: skip
    try:
        wait_until(lambda: "ready" in job_log_read(Job.objects.get(pk=job["id"]), offset=0, limit=4096).data,
                   timeout=30, what="the job running")  # fmt: skip
        time.sleep(2)  # some usage first
        response = shopper.http.post(f"/api/v1/jobs/{job['id']}/cancel")
        cancelled_at = time.time()  # the cancel has committed: its answer came
        assert response.status_code == 200, response.text
        final = shopper.wait_final(job["id"])
        allocation = Allocation.objects.get(job_id=job["id"])
        wait_until(lambda: Allocation.objects.get(pk=allocation.pk).released_at, timeout=30, what="the release")
        text = job_log_read(Job.objects.get(pk=job["id"]), offset=0, limit=4096).data
    except AssertionError as error:
        raise AssertionError(f"{error}\n{dump_logs(stack)}") from None
    assert final["state"] == "cancelled"
    term_at = float(text.split("TERM-AT ")[1].split()[0])
    assert term_at - cancelled_at < 1.0, (term_at - cancelled_at, dump_logs(stack))
    # Billed no further: the job's GPU time ends when it ended, under a second after the cancel.
    allocation = Allocation.objects.get(pk=allocation.pk)
    used_ms = allocation.usage_samples.aggregate(total=Sum("gpu_ms"))["total"]
    started = AuditEvent.objects.get(subject_id=job["id"], action="job.started").created_at.timestamp()
    assert used_ms <= (term_at + 1.0 - started) * 1000, (used_ms, term_at - started)
    last = allocation.usage_samples.order_by("-recorded_at").first().recorded_at.timestamp()
    assert last <= term_at + 1.0


def test_a_jobs_secret_reaches_its_process_and_nothing_else(running_stack, tmp_path):
    """Through the real processes: the value reaches the job's environment, and no trace of it is
    left in the job's log (masked on the shed), the processes' logs, the audit trail or any answer."""
    stack = running_stack
    _, renter, _, shopper = agent_start(stack, tmp_path, connection="stream")
    value = "hf_e2e-Secret-Value-0123456789"
    assert shopper.http.put("/api/v1/secrets/hf-token", json={"value": value}).status_code == 201
    # The job prints the value (masked before the log leaves the shed) and its length (checked here).
    script = 'echo "epochs=$EPOCHS"; echo "token=$HF_TOKEN"; echo "length=${#HF_TOKEN}"'
    job = shopper.submit(image="docker.io/library/python:3.12-slim", command=["sh", "-c", script],
                         jurisdictions=["DE"], env={"EPOCHS": "3"}, secrets={"HF_TOKEN": "hf-token"})  # fmt: skip
    try:
        final = shopper.wait_final(job["id"])
        text = wait_until(
            lambda: (log := job_log_read(Job.objects.get(pk=job["id"]), offset=0, limit=4096).data) and "length=" in log
            and log,
            timeout=30, what="the job's log",
        )  # fmt: skip
    except AssertionError as error:
        raise AssertionError(f"{error}\n{dump_logs(stack)}") from None

    assert final["state"] == "succeeded", dump_logs(stack)
    assert "epochs=3" in text and f"length={len(value)}" in text
    assert f"token={'*' * len(value)}" in text
    paths = [f"/api/v1/jobs/{job['id']}{tail}" for tail in ("", "/events", "/logs", "/placements")]
    answers = [shopper.http.get(path).text for path in [*paths, "/api/v1/secrets"]]
    audit = str(list(AuditEvent.objects.values_list("action", "actor", "data")))
    processes = [stack.log(name) for name in ("web", "worker", "agent")]
    for place in [text, audit, *answers, *processes]:
        assert value not in place
    assert "job.secrets_delivered" in audit
