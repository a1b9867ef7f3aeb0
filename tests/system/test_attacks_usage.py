"""Attacks by an owner's agent on the live stack (real gunicorn and Celery worker): usage it has
not earned, and refusals meant to make renters' jobs fail. Each asserts the exact status, that
no money moved and nothing was stored, and that another renter's requests stayed fast."""

import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from billing.selectors import wallet_balance_micros
from billing.services import usage_post, wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.jobs.models import Allocation, Job, UsageSample
from marketplace.kernel.models import AuditEvent
from nodes.models import Unit
from nodes.services import unit_register
from tests.conftest import user_make
from tests.e2e import Renter, free_port, stack_start, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

HOUR_MS = 3_600_000
SLOW_S = 3.0  # the most another renter's request may take while the attack goes on
CREDIT = 50_000_000


class Shed:
    """An owner's agent written by the attacker: the agent API spoken directly over HTTP."""

    def __init__(self, base_url: str, token: str, name: str) -> None:
        enrolled = httpx.post(f"{base_url}/api/agent/v1/enrol", json={"token": token, "hostname": name}, timeout=10)
        assert enrolled.status_code == 201, enrolled.text
        credential = enrolled.json()["credential"]
        self.http = httpx.Client(
            base_url=f"{base_url}/api/agent/v1", headers={"Authorization": f"Bearer {credential}"}, timeout=10
        )
        self.gpus = [{"index": 0, "uuid": f"GPU-{name}-0", "model": "H100", "vram_mb": 81920}]

    def beat(self, running=()) -> None:
        response = self.http.post("/heartbeat", json={"gpus": self.gpus, "running": list(running)})
        assert response.status_code == 200, response.text

    def next(self) -> dict | None:
        response = self.http.get("/assignments/next", params={"wait": 0})
        assert response.status_code in (200, 204), response.text
        return response.json() if response.status_code == 200 else None

    def assignment(self) -> dict:
        return wait_until(lambda: self.beat() or self.next(), timeout=30, what="an assignment")

    def usage(self, allocation_id: str, samples: list[dict]) -> httpx.Response:
        return self.http.post(f"/allocations/{allocation_id}/usage", json={"samples": samples})

    def finish(self, allocation_id: str, exit_code, reason: str) -> dict:
        response = self.http.post(
            f"/allocations/{allocation_id}/finish", json={"exit_code": exit_code, "reason": reason}
        )
        assert response.status_code == 200, response.text
        return response.json()


class Bystander:
    """Another renter reading their jobs throughout the attack; the slowest answer is kept."""

    def __init__(self, base_url: str) -> None:
        _, key = api_key_create(user=user_make("bea-bystander"), name="e2e")
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> "Bystander":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _read(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            response = self.http.get("/api/v1/jobs")
            self.slowest = max(self.slowest, time.monotonic() - began)
            assert response.status_code == 200
            self._stop.wait(0.2)


def problem(response: httpx.Response, status: int, rule: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["type"] == f"/problems/{rule}", response.text


def stamp(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


@pytest.fixture
def strict_stack(tmp_path):
    """The live stack with usage rules short enough to wait out: a 10 s grace after the release,
    1 s of clock skew, and a review after 3 implausible reports."""
    stack = stack_start(
        tmp_path, port=free_port(), USAGE_LATE_GRACE_S="10", USAGE_CLOCK_SKEW_S="1", USAGE_REVIEW_AFTER="3"
    )
    yield stack
    stack.stop_all()


def test_usage_an_agent_has_not_earned_is_refused_and_never_billed(strict_stack, client):
    stack = strict_stack
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    wallet_credit_promotional(user=renter, amount_micros=CREDIT, key="e2e-credit")
    unit, token = unit_register(owner=owner, name="Greedy shed", country="DE")
    _, api_key = api_key_create(user=renter, name="e2e")
    shed, shopper = Shed(stack.base_url, token, "greedy"), Renter(stack.base_url, api_key)
    job = shopper.submit(image="busybox", command=["sleep", "1"])
    allocation_id = shed.assignment()["allocation_id"]
    assert shed.http.post(f"/allocations/{allocation_id}/start", json={}).status_code == 200

    with Bystander(stack.base_url) as bystander:
        # Ten samples of 64 GPU-hours each for a one-GPU job that has run for seconds.
        greedy = [{"seq": n, "gpu_ms": 64 * HOUR_MS, "recorded_at": stamp(datetime.now(UTC))} for n in range(1, 11)]
        problem(shed.usage(allocation_id, greedy), 422, "usage-exceeds-gpu-time")
        # Times outside the allocation's life.
        for n, absurd in enumerate(["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z"]):
            sample = {"seq": 20 + n, "gpu_ms": 1000, "recorded_at": absurd}
            problem(shed.usage(allocation_id, [sample]), 422, "usage-recorded-outside-allocation")
        assert shed.finish(allocation_id, 0, "exited") == {"state": "succeeded"}
        released_at = Allocation.objects.get(pk=allocation_id).released_at
        # A sample taken after the release, sent within the grace.
        wait_until(lambda: datetime.now(UTC) > released_at + timedelta(seconds=2), timeout=10, what="2 s on")
        after = {"seq": 30, "gpu_ms": 1000, "recorded_at": stamp(datetime.now(UTC))}
        problem(shed.usage(allocation_id, [after]), 409, "usage-after-release")
        # Time before the release, sent after the grace.
        wait_until(lambda: datetime.now(UTC) > released_at + timedelta(seconds=11), timeout=20, what="the grace")
        late = {"seq": 31, "gpu_ms": 1000, "recorded_at": stamp(released_at - timedelta(seconds=1))}
        problem(shed.usage(allocation_id, [late]), 409, "usage-allocation-ended")

    assert bystander.slowest < SLOW_S
    # Nothing stored, so nothing to rate: the renter's wallet is untouched.
    assert not UsageSample.objects.filter(allocation_id=allocation_id).exists()
    assert usage_post(allocation_id=allocation_id) is None
    assert wallet_balance_micros(renter) == CREDIT
    refusals = AuditEvent.objects.filter(action="unit.usage_refused", subject_id=unit.pk)
    assert refusals.count() == 6
    # Four implausible reports: the unit is under review, out of placement, and its owner told why.
    unit.refresh_from_db()
    assert unit.review_since is not None and "implausible usage reports" in unit.review_reason
    second = shopper.submit(image="busybox", command=["true"])
    pending = wait_until(
        lambda: (found := shopper.job(second["id"]))["pending_reason"].get("rejected") and found,
        timeout=30,
        what="the second job pending",
    )
    assert pending["pending_reason"]["rejected"] == {"unit_under_review": 1}
    assert shopper.job(job["id"])["state"] == "succeeded"
    client.force_login(owner)
    assert "Under review since" in client.get(f"/portal/units/{unit.pk}/").content.decode()


def test_refusing_every_assignment_neither_fails_the_job_nor_gets_it_back(running_stack):
    stack = running_stack
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    wallet_credit_promotional(user=renter, amount_micros=CREDIT, key="e2e-credit")
    _, api_key = api_key_create(user=renter, name="e2e")
    sheds = {}
    for n in range(4):  # more refusing units than the job has attempts (JOB_MAX_ATTEMPTS is 3)
        unit, token = unit_register(owner=owner, name=f"Refusing shed {n}", country="DE")
        sheds[unit.pk] = Shed(stack.base_url, token, f"refusing-{n}")
        sheds[unit.pk].beat()
    shopper = Renter(stack.base_url, api_key)
    job = shopper.submit(image="busybox", command=["true"])
    offered: list = []

    def refuse_all() -> None:
        for unit_id, shed in sheds.items():
            shed.beat()
            if assignment := shed.next():
                offered.append((unit_id, assignment["job"]["id"]))
                assert shed.finish(assignment["allocation_id"], None, "refused:limits") == {"state": "queued"}

    with Bystander(stack.base_url) as bystander:
        wait_until(lambda: refuse_all() or len(offered) == 4, timeout=60, what="every shed to refuse once")
        pending = wait_until(
            lambda: (found := shopper.job(job["id"]))["pending_reason"].get("rejected") and found,
            timeout=30,
            what="the job pending again",
        )
        for _ in range(5):  # the sheds keep asking, and are not offered the job again
            refuse_all()

    assert bystander.slowest < SLOW_S
    assert sorted(offered) == sorted((unit_id, job["id"]) for unit_id in sheds)
    assert pending["state"] == "queued"
    assert pending["pending_reason"]["rejected"] == {"unit_refused": 4}
    stored = Job.objects.get(pk=job["id"])
    assert (stored.state, stored.attempts, stored.refusals) == (Job.State.QUEUED, 0, 4)
    assert all(
        reliability < 0.5 for reliability in Unit.objects.filter(pk__in=sheds).values_list("reliability", flat=True)
    )
    assert not UsageSample.objects.filter(allocation__job_id=job["id"]).exists()
    assert wallet_balance_micros(renter) == CREDIT
