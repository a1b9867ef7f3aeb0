import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import connection, transaction
from rest_framework.test import APIClient

from marketplace.accounts.services import api_key_create
from marketplace.jobs import placement
from marketplace.jobs.services import job_submit
from nodes.services import GpuReport, unit_enrol, unit_heartbeat, unit_register


def pytest_collection_modifyitems(config, items):
    """``pg`` tests need PostgreSQL and are skipped on SQLite; the slow folders are marked
    ``slow`` so a quick run can leave them out (``-m "not slow"``)."""
    needs_pg = pytest.mark.skip(reason="needs PostgreSQL (set DATABASE_URL)")
    for item in items:
        if item.get_closest_marker("pg") and connection.vendor != "postgresql":
            item.add_marker(needs_pg)
        if item.get_closest_marker("e2e") or item.get_closest_marker("browser") or "/devtools/" in str(item.path):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def placement_view_reset():
    """Each test starts with a fresh capacity view: the database under it is rolled back."""
    placement.engine_reset()
    yield
    placement.engine_reset()


@pytest.fixture(autouse=True)
def cache_reset():
    """Rate-limit counters and other cached state do not carry from one test to the next."""
    cache.clear()
    yield
    cache.clear()


# Set by the browser tests for this process only (ORM calls next to Playwright's event loop).
PROCESS_ONLY = ("DJANGO_ALLOW_ASYNC_UNSAFE",)


def child_environ() -> dict[str, str]:
    """The environment for a child process (a server, a command): this process's, less what
    only this test process may have."""
    return {name: value for name, value in os.environ.items() if name not in PROCESS_ONLY}


def run_async(coroutine):
    """Run a coroutine to its end on an event loop of its own, in a thread of its own: the browser
    tests' Playwright keeps a loop running in the main thread for the rest of the session."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def user_make(username: str, **extra):
    return get_user_model().objects.create_user(username=username, password="pw-" + username, **extra)


@pytest.fixture
def owner(db):
    return user_make("olivia-owner")


@pytest.fixture
def renter(db):
    return user_make("rita-renter")


@pytest.fixture
def stranger(db):
    return user_make("sam-stranger")


@pytest.fixture
def staff(db):
    return user_make("stella-staff", is_staff=True)


def renter_client(user) -> APIClient:
    api_key, key = api_key_create(user=user, name="tests")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    client.key_pk = api_key.pk
    return client


@pytest.fixture
def renter_api(renter):
    return renter_client(renter)


@pytest.fixture
def stranger_api(stranger):
    return renter_client(stranger)


def gpus_make(count: int, *, model: str = "H100", vram_mb: int = 81920, prefix: str = "GPU") -> list[GpuReport]:
    return [GpuReport(index=i, uuid=f"{prefix}-{i}", model=model, vram_mb=vram_mb) for i in range(count)]


def unit_online(owner, *, name: str = "shed", country: str = "DE", gpus: int = 4, **policy):
    """A unit that has enrolled and sent one heartbeat; returns (unit, node credential)."""
    unit, token = unit_register(owner=owner, name=name, country=country)
    unit, credential = unit_enrol(token=token, hostname=f"{name}.local", agent_version="test")
    if policy:
        for field, value in policy.items():
            setattr(unit, field, value)
        unit.save()
    unit_heartbeat(unit=unit, gpus=gpus_make(gpus, prefix=f"GPU-{name}"))
    return unit, credential


def agent_client(credential: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {credential}")
    return client


PROBLEM_KEYS = {"type", "title", "status", "detail"}

JOB_SPEC = {"image": "ghcr.io/acme/train:1.0", "command": ["python", "train.py"]}


def job_make(renter, **spec):
    """A queued job submitted through the service with a minimal valid spec."""
    return job_submit(renter=renter, spec={**JOB_SPEC, **spec})


def allocation_since(allocation, at):
    """Let the allocation have been active since ``at`` (its creation moved back), so that the
    usage a test records for the time after is plausible (marketplace/jobs/usage.py)."""
    from marketplace.jobs.models import Allocation

    Allocation.objects.filter(pk=allocation.pk).update(created_at=at)
    allocation.created_at = at
    return allocation


def problem_of(response, status: int) -> dict:
    """The problem+json body of an error response, after checking its status, type and shape."""
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/problem+json"), response["Content-Type"]
    body = response.json()
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status
    return body


@pytest.fixture
def running_stack(tmp_path):
    """Web server and Celery worker as real processes on the test database; see tests/e2e.py."""
    from tests.e2e import free_port, stack_start

    stack = stack_start(tmp_path, port=free_port())
    yield stack
    stack.stop_all()


@pytest.fixture
def stripe_fake(settings):
    """Stripe answered in memory through the real SDK: a fresh ``FakeStripe`` per test."""
    from billing import stripe_api
    from tests.stripe_fake import FakeStripe

    fake = FakeStripe()
    settings.STRIPE_SECRET_KEY = "sk_test_fake"
    settings.STRIPE_WEBHOOK_SECRETS = ["whsec_test_current"]
    stripe_api.install(fake)
    yield fake
    stripe_api.uninstall()


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium under Playwright, headless, for the whole run."""
    from tests.browser import chromium_or_skip

    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the test's own ORM calls are
    # still synchronous, so Django's guard against ORM calls inside a loop is lifted here.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # never passed on to children (child_environ)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()
    del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


@pytest.fixture
def browser_page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    page = context.new_page()
    yield page
    context.close()


def ledger_backdate(txn, at) -> None:
    """Tests only: move a posting back in time (inside or outside a hold window). The ledger is
    append-only, a trigger refusing UPDATE on PostgreSQL; a superuser may lift triggers for one
    transaction, which is what this does, and nothing outside the tests can."""
    from billing.models import LedgerTransaction

    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")
        LedgerTransaction.objects.filter(pk=txn.pk).update(created_at=at)
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = DEFAULT")


# --- The operator's tools: admin actions and runbook commands -----------------------------------


@pytest.fixture
def operator(db):
    return user_make("otto-operator", is_staff=True, is_superuser=True)


@pytest.fixture
def plain_static(settings):
    """Admin pages render without the collected static files' manifest."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


def admin_action(user, action: str, rows) -> list[str]:
    """POST the admin changelist's ``action`` for ``rows`` (of one model) as ``user``; the
    messages it left, one per row."""
    from django.contrib.messages import get_messages
    from django.test import Client

    meta = rows[0]._meta
    client = Client()
    client.force_login(user)
    response = client.post(
        f"/admin/{meta.app_label}/{meta.model_name}/", {"action": action, "_selected_action": [str(r.pk) for r in rows]}
    )
    assert response.status_code in (200, 302), response.content
    return [str(message) for message in get_messages(response.wsgi_request)]


def command(*args) -> tuple[int, str]:
    """A management command's exit code and what it printed (its error line, if it failed)."""
    from io import StringIO

    from django.core.management import CommandError, call_command

    out = StringIO()
    try:
        call_command(*args, stdout=out)
    except CommandError as error:
        return error.returncode, f"{out.getvalue()}{error}"
    return 0, out.getvalue()
