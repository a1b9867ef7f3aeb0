"""Attacks on what a renter's job can reach: the owner's network through the image's registry,
and the agent's own credential from inside a job. Against the live server (gunicorn + worker)."""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from billing.models import LedgerEntry
from billing.selectors import wallet_balance_micros
from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from marketplace.jobs.models import Allocation, Job, UsageSample
from marketplace.jobs.services import job_submit
from marketplace.kernel.models import AuditEvent
from nodes.agent import gpus
from nodes.agent.client import AgentClient
from nodes.agent.images import ImagePolicy
from nodes.agent.isolation import LEVELS, IsolationConfig
from nodes.agent.loop import Agent, Options
from nodes.agent.refusal import LocalPolicy
from nodes.agent.runtime.docker import DockerRuntime
from nodes.models import Unit
from nodes.services import unit_register
from tests.agent.docker_fakes import FakeDocker
from tests.conftest import user_make
from tests.e2e import Renter, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CREDIT = 50_000_000
INTERNAL_IMAGES = [
    "127.0.0.1:6379/x",
    "10.0.0.5:5000/x",
    "[::1]:5000/x",
    "localhost:5000/x",
    "169.254.169.254/latest",
    "[::ffff:10.0.0.5]:5000/x",
    "127.1:2375/x",
    "nas.local:5000/x",
]
# Another renter's ordinary request while the attacks go on must still be answered within this.
OTHER_RENTER_BOUND_S = 5.0


def renter_with_key(name: str):
    renter = user_make(name)
    wallet_credit_promotional(user=renter, amount_micros=CREDIT, key=f"{name}-credit")
    return renter, api_key_create(user=renter, name="attack")[1]


def test_images_on_internal_registries_are_refused_at_submit_with_nothing_stored_or_charged(running_stack):
    stack = running_stack
    attacker, attacker_key = renter_with_key("mallory-renter")
    _, bystander_key = renter_with_key("rita-renter")
    entries = LedgerEntry.objects.count()
    http = httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {attacker_key}"}, timeout=10)
    bystander = httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {bystander_key}"}, timeout=10)

    for image in INTERNAL_IMAGES:
        response = http.post("/api/v1/jobs", json={"image": image, "command": ["true"]})
        assert response.status_code == 400, (image, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["type"] == "/problems/validation-error"
        assert "loopback, private or local" in problem["errors"]["image"][0], image
        started = time.monotonic()
        assert bystander.get("/api/v1/balance").status_code == 200
        assert time.monotonic() - started < OTHER_RENTER_BOUND_S

    assert not Job.objects.exists()
    assert not AuditEvent.objects.filter(action="job.submitted").exists()
    assert LedgerEntry.objects.count() == entries
    assert wallet_balance_micros(attacker) == CREDIT


def test_an_agent_refuses_before_any_pull_an_image_whose_registry_the_server_could_not_judge(running_stack, tmp_path):
    """Jobs reach the agent another way than the API's check: a name the server cannot judge (it
    resolves to a private address only on the owner's network), a registry that is not on the
    owner's list, and an internal address in a job written without the API."""
    stack = running_stack
    owner = user_make("olivia-owner")
    renter, api_key = renter_with_key("mallory-renter")
    unit, token = unit_register(owner=owner, name="Docker shed", country="DE")
    enrolment = AgentClient(stack.base_url).enrol(token=token, hostname="docker-shed")
    # The owner's network answers for ghcr.io with a private address (poisoned or split DNS).
    owners_dns = {"ghcr.io": ["10.20.30.40"], "docker.io": ["104.18.0.1"]}
    images = ImagePolicy(resolve=lambda host: owners_dns.get(host, []))
    policy = LocalPolicy(country="DE", isolation_levels=frozenset(LEVELS), registries=images)
    engine = FakeDocker(images=())
    runtime = DockerRuntime(engine, IsolationConfig(runtime="docker"), tmp_path / "logs", images=images)

    renter_api = Renter(stack.base_url, api_key)
    rebound = renter_api.submit(image="ghcr.io/mallory/scan:1", command=["true"])
    unlisted = renter_api.submit(image="registry.mallory.example:6379/x", command=["true"])
    bypassed = job_submit(renter=renter, spec={"image": "10.0.0.5:5000/x", "command": ["true"]})
    jobs = {rebound["id"]: "ghcr.io", unlisted["id"]: "registry.mallory.example:6379", str(bypassed.pk): "10.0.0.5"}

    client = AgentClient(stack.base_url, enrolment.credential)
    inventory = gpus.simulate("2xH100-80GB", enrolment.unit_id)
    options = Options(max_jobs=len(jobs), tick_s=0.05, poll_wait_s=0, error_base_s=0.1, drain_report_timeout_s=5)
    deadline = time.monotonic() + 60

    def sleep(seconds: float) -> None:
        assert time.monotonic() < deadline, f"the agent did not take the jobs\n{stack.log('web')[-3000:]}"
        time.sleep(seconds)

    Agent(client, runtime, inventory, options, sleep=sleep, policy=policy, state_dir=tmp_path / "state").run()

    for job_id, registry in jobs.items():
        refused = wait_until(
            lambda job_id=job_id: AuditEvent.objects.filter(action="allocation.refused", subject_id=job_id).first(),
            timeout=15,
            what=f"the refusal of {registry}",
        )
        assert refused.data["reason"] == "refused:registry"
        assert refused.data["unit"] == str(unit.pk)
        assert Job.objects.get(pk=job_id).state == Job.State.QUEUED  # placed elsewhere, never here again
    assert engine.pulls == [] and engine.created == []
    assert not UsageSample.objects.filter(allocation__unit=unit).exists()
    assert Allocation.objects.filter(unit=unit, released_at__isnull=True).count() == 0
    assert wallet_balance_micros(renter) == CREDIT
    assert Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE


@pytest.fixture
def open_folder():
    """A folder anyone may enter, like /var/lib: pytest's own are root's alone, which would hide
    what the agent's file modes do."""
    path = Path(tempfile.mkdtemp(prefix="shedshare-attack-"))
    os.chmod(path, 0o755)  # noqa: S103 - the point of the fixture
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only an agent started as root runs jobs as another user")
def test_a_job_on_a_root_agents_process_runtime_cannot_read_its_config_or_credential(running_stack, open_folder):
    stack = running_stack
    owner = user_make("olivia-owner")
    renter, api_key = renter_with_key("mallory-renter")
    unit, token = unit_register(owner=owner, name="Dev shed", country="DE")
    config = open_folder / "agent" / "agent.json"
    enrol = ("enrol", "--url", stack.base_url, "--token", token, "--config", str(config), "--country", "DE")
    assert stack.run(devstack.agent_argv(*enrol)).returncode == 0
    os.chmod(config.parent, 0o755)  # noqa: S103 - even where the owner opened the config's folder
    os.chmod(config, 0o644)  # and its file: the agent makes it private again when it starts
    credential = json.loads(config.read_text())["credential"]
    state = config.parent / "state"
    stack.start(
        "agent",
        devstack.agent_argv(
            "run", "--config", str(config), "--simulate", "1xH100-80GB", "--usage-interval", "1", "--dev-runtime",
        ),
    )  # fmt: skip
    wait_until(lambda: Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE, timeout=30, what="the unit online")

    steal = (
        f"id -u; cat {config}; ls {state}; cat {state}/status.json; "
        f"grep -l shs_node /proc/[0-9]*/environ {config.parent}/* 2>/dev/null; echo finished"
    )
    job = Renter(stack.base_url, api_key).submit(image="busybox", command=["sh", "-c", steal])
    final = Renter(stack.base_url, api_key).wait_final(job["id"])
    logs = httpx.get(
        f"{stack.base_url}/api/v1/jobs/{job['id']}/logs",
        params={"format": "txt"},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10,
    ).text

    assert final["state"] == "succeeded", stack.log("agent")[-3000:]
    assert logs.splitlines()[0] == "65534", logs
    assert credential not in logs and "/environ" not in logs
    assert f"cat: {config}: Permission denied" in logs
    assert f"ls: cannot open directory '{state}': Permission denied" in logs
    assert "finished" in logs
    assert config.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
