"""Attacks on the marketplace, one test per rule it keeps against hostile owners, renters and
strangers, each over HTTP against the live stack (gunicorn and a Celery worker on the test
database, ``running_stack``) where the attack is over HTTP. Each asserts the exact answer, that
no money moved that should not have, and that nothing was stored that should not have been."""

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from billing.selectors import wallet_balance_micros
from billing.services import usage_post, wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.jobs.models import Allocation
from marketplace.kernel.money import usage_cost_micros
from nodes.models import Unit
from nodes.services import unit_location_attest, unit_location_declare, unit_policy_update, unit_register
from tests.conftest import user_make
from tests.e2e import Renter, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

AGENT = "/api/agent/v1"
CREDIT = 100_000_000  # $100 of promotional credit: the live stack wants a 10-minute run covered
PRICE = 360_000_000  # $360 per GPU-hour: 0.1 micro-units a millisecond
ONE_GPU = [{"index": 0, "uuid": "GPU-attack-0", "model": "H100", "vram_mb": 81920}]


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


class Agent:
    """A hostile or honest agent speaking the agent API by hand, so a test controls every call."""

    def __init__(self, base_url: str, token: str) -> None:
        enrolled = httpx.post(f"{base_url}{AGENT}/enrol", json={"token": token, "hostname": "attack"}, timeout=10)
        assert enrolled.status_code == 201, enrolled.text
        self.unit_id = enrolled.json()["unit_id"]
        credential = enrolled.json()["credential"]
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {credential}"}, timeout=10)

    def beat(self, running=(), **extra) -> dict:
        response = self.http.post(f"{AGENT}/heartbeat", json={"gpus": ONE_GPU, "running": list(running), **extra})
        assert response.status_code == 200, response.text
        return response.json()

    def next_assignment(self) -> dict | None:
        response = self.http.get(f"{AGENT}/assignments/next", params={"wait": 0})
        assert response.status_code in (200, 204), response.text
        return response.json() if response.status_code == 200 else None

    def wait_assignment(self, shopper: Renter, job_id: str) -> dict:
        return wait_until(
            self.next_assignment, timeout=30, what=lambda: f"an assignment; the job: {shopper.job(job_id)}"
        )

    def post(self, allocation_id: str, call: str, body: dict | None = None) -> httpx.Response:
        return self.http.post(f"{AGENT}/allocations/{allocation_id}/{call}", json=body)


def market(stack, *, country: str = "FR"):
    """An owner's enrolled unit (its agent driven by hand), a funded renter and their client."""
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    wallet_credit_promotional(user=renter, amount_micros=CREDIT, key="attack-credit")
    unit, token = unit_register(owner=owner, name="Garden shed", country=country)
    # Dear enough that a fraction of a second of GPU time is a whole micro-unit, cheap enough that
    # the credit covers a job's minimum run.
    unit_policy_update(unit=unit, actor="test", price_per_gpu_hour_micros=PRICE)
    agent = Agent(stack.base_url, token)
    agent.beat()
    _, api_key = api_key_create(user=renter, name="attacks")
    return owner, renter, Unit.objects.get(pk=unit.pk), agent, Renter(stack.base_url, api_key)


def elapsed_since(moment: datetime, ms: int) -> None:
    """Wait until at least ``ms`` of the server's clock (the same host's) has passed since moment."""
    wait_until(lambda: datetime.now(UTC) - moment >= timedelta(milliseconds=ms), timeout=10, interval=0.05)


def test_residency_holds_for_as_long_as_the_job_runs(running_stack):
    """A job restricted to a verified FR location, running, when the owner declares the unit in
    the US: the agent is told to stop it, the renter reads why, and nothing after is billed."""
    owner, renter, unit, agent, shopper = market(running_stack)
    unit_location_attest(unit=unit, by=user_make("oscar-operator", is_staff=True))
    job = shopper.submit(
        image="ghcr.io/acme/train:1", command=["train"], jurisdictions=["FR"], require_verified_location=True
    )
    allocation_id = agent.wait_assignment(shopper, job["id"])["allocation_id"]
    assert agent.post(allocation_id, "start").status_code == 200
    started = Allocation.objects.get(pk=allocation_id).job.started_at
    elapsed_since(started, 300)

    unit_location_declare(unit=Unit.objects.get(pk=unit.pk), country="US", actor=f"user:{owner.pk}")
    breach = Allocation.objects.get(pk=allocation_id).preempted_at

    reply = agent.beat(running=[allocation_id])
    assert allocation_id in reply["cancel"] and allocation_id in reply["preempt"]
    ended = shopper.job(job["id"])
    assert ended["state"] == "failed" and ended["failure_reason"].startswith("residency:")
    events = shopper.http.get(f"/api/v1/jobs/{job['id']}/events").json()["results"]
    breached = [event for event in events if event["action"] == "job.residency_breached"]
    assert [event["detail"]["reason"] for event in breached] == ["jurisdiction"]

    # The agent's meter: time before the breach is the renter's to pay, time after is not.
    elapsed_since(breach, 300)
    before_ms = 250
    samples = [
        {"seq": 1, "gpu_ms": before_ms, "recorded_at": stamp(started + timedelta(milliseconds=before_ms))},
        {"seq": 2, "gpu_ms": 250, "recorded_at": stamp(breach + timedelta(milliseconds=250))},
    ]
    assert agent.post(allocation_id, "usage", {"samples": samples}).status_code == 200
    assert agent.post(allocation_id, "finish", {"exit_code": None, "reason": "preempted"}).status_code == 200
    usage_post(allocation_id=allocation_id)  # what the worker does after the finish, at once and idempotent

    price = Allocation.objects.get(pk=allocation_id).price_per_gpu_hour_micros
    charged = usage_cost_micros(gpu_ms=before_ms, price_per_gpu_hour_micros=price)
    assert charged > 0
    assert wallet_balance_micros(renter) == CREDIT - charged
    assert Allocation.objects.get(pk=allocation_id).release_reason == "residency"
