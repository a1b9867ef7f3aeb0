"""``bench agents``: its swarm's agents speak the stream protocol to a real web server (beats, pushed
work started, reported and finished, a cancel obeyed), and the benchmark refuses SQLite."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from billing.models import BillingProfile
from marketplace.devtools import devstack
from marketplace.jobs.models import Allocation, Job, UsageSample
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import job_cancel
from tests.conftest import gpus_make, job_make, unit_online
from tests.e2e import free_port, stack_start, wait_until

WAIT_S = 60  # generous: real processes on a busy machine


@pytest.fixture
def web(tmp_path):
    port = free_port()
    stack = stack_start(tmp_path, port=port)
    yield f"ws://127.0.0.1:{port}/api/agent/v1/stream"
    stack.stop_all()


class Swarm:
    def __init__(self, tmp_path, spec: dict):
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        self.results = tmp_path / "results.json"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "marketplace.devtools.bench.swarm", str(tmp_path / "spec.json"), str(self.results)],
            cwd=devstack.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def status(self, key: str) -> dict:
        """The next status line that has ``key``."""
        for line in self.process.stdout:
            status = json.loads(line)
            if key in status:
                return status
        raise AssertionError(f"the swarm exited without a {key!r} line")

    def command(self, text: str) -> None:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.command("stop")
        try:
            return self.process.wait(30)
        finally:
            self.process.kill()


def agent_spec(unit, credential: str, url: str, run_s: list[float]) -> dict:
    gpus = [asdict(gpu) for gpu in gpus_make(1, prefix=f"GPU-{unit.name}")]
    return {"unit": str(unit.pk), "url": url, "credential": credential, "gpus": gpus, "run_s": run_s}


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_the_swarms_agents_run_pushed_work_and_obey_a_cancel(web, tmp_path, owner, renter):
    # Postpaid: the quick job's usage is posted when it ends, and a prepaid renter with an empty
    # wallet would have the slow job stopped at its floor.
    BillingProfile.objects.create(user=renter, postpaid=True)
    quick, quick_credential = unit_online(owner, name="quick", country="DE", gpus=1)
    slow, slow_credential = unit_online(owner, name="slow", country="FR", gpus=1)
    agents = [agent_spec(quick, quick_credential, web, [1, 1]), agent_spec(slow, slow_credential, web, [600, 600])]
    spec = {"ramp_per_s": 10, "ramp_pending": 2, "seed": 1, "agents": agents}
    swarm = Swarm(tmp_path, spec)
    try:
        wait_until(lambda: swarm.status("connected")["connected"] == 2, timeout=WAIT_S, what="both agents connected")
        done = job_make(renter, gpu_count=1, jurisdictions=["DE"])
        cancelled = job_make(renter, gpu_count=1, jurisdictions=["FR"])
        for job in (done, cancelled):
            job_place(job_id=job.pk)  # as the worker would: the web server's stream pushes it

        def state(job) -> str:
            return Job.objects.values_list("state", flat=True).get(pk=job.pk)

        wait_until(lambda: state(done) == Job.State.SUCCEEDED, timeout=WAIT_S, what="the quick job to succeed")
        wait_until(lambda: state(cancelled) == Job.State.RUNNING, timeout=WAIT_S, what="the slow job to run")
        job_cancel(job=Job.objects.get(pk=cancelled.pk), actor="test")
        slow_allocation = Allocation.objects.get(job=cancelled)
        wait_until(
            lambda: Allocation.objects.filter(pk=slow_allocation.pk, released_at__isnull=False).exists(),
            timeout=WAIT_S,
            what="the agent to finish the cancelled job",
        )
        swarm.command("report")
        swarm.status("reported")
        measured = json.loads(swarm.results.read_text())
    finally:
        exit_code = swarm.stop()

    quick_allocation = Allocation.objects.get(job=done)
    assert UsageSample.objects.filter(allocation=quick_allocation).exists()
    assert set(measured["assigned"]) == {str(quick_allocation.pk), str(slow_allocation.pk)}
    assert list(measured["cancelled"]) == [str(slow_allocation.pk)]
    assert set(measured["established"]) == {str(quick.pk), str(slow.pk)}
    assert measured["hb_at"] and len(measured["hb_at"]) == len(measured["hb_ms"])
    assert measured["errors"] == {} and measured["drops"] == {}
    assert exit_code == 0


def test_the_benchmark_needs_postgresql(db):
    if connection.vendor == "postgresql":
        pytest.skip("refuses SQLite only")
    with pytest.raises(CommandError, match="needs PostgreSQL"):
        call_command("bench", "agents", "--units", "1")
