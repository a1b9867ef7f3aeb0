"""The owner's whole journey through the portal in a real browser (Debian's Chromium):
sign up → register a unit → enrol a simulated agent → the unit comes online without a reload →
edit the policy (a validation error first) → earnings after a renter's job → start Stripe Connect
onboarding against the local Stripe fake. Every page of the journey, and then every page a person
can open, passes axe-core's WCAG A/AA check, and a screenshot of each step is kept
(tests/browser.py says where). The same pages work with JavaScript off, and a unit can be
registered with the keyboard alone.

The web server is pytest-django's live server, in this process, so the Stripe fake installed by
the ``stripe_fake`` fixture answers it; Celery tasks run eagerly in it, standing in for the worker.
The agent is a real ``shedshare-agent`` process with simulated GPUs, talking HTTP to that server.
"""

import subprocess

import httpx
import pytest
from playwright.sync_api import expect

from billing.models import BillingProfile
from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.celery import app as celery_app
from marketplace.devtools import devstack
from marketplace.jobs.models import Job
from marketplace.jobs.placement import job_place
from nodes.models import Unit
from tests.browser import assert_accessible, screenshot
from tests.conftest import job_make, unit_online, user_make
from tests.e2e import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.django_db(transaction=True)]
PASSWORD = "lawn-kettle-shed-4417"
STRIPE_HOSTED = "https://connect.stripe-fake.test/**"
STOP, RESUME = "Thermal stop threshold, in °C:", "Thermal resume threshold, in °C:"
PRICE = "Price per GPU-hour, in USD:"


@pytest.fixture
def portal(live_server, settings, stripe_fake):
    settings.HEARTBEAT_INTERVAL_S = 1
    settings.ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
    eager = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield live_server.url
    celery_app.conf.task_always_eager = eager


@pytest.fixture
def agent(tmp_path):
    """Enrols and runs a simulated agent against the portal; stopped at the end of the test."""
    started = []

    def start(url: str, token: str) -> subprocess.Popen:
        config = str(tmp_path / "agent.json")
        enrol = devstack.agent_argv("enrol", "--url", url, "--token", token, "--config", config, "--country", "DE")
        enrolled = subprocess.run(enrol, capture_output=True, text=True, timeout=60)
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
        run = devstack.agent_argv(
            "run", "--config", config, "--simulate", "2xH100-80GB", "--work-dir", str(tmp_path / "work"),
            "--usage-interval", "1", "--dev-runtime",
        )  # fmt: skip
        log = open(tmp_path / "agent.log", "w")  # noqa: SIM115 - closed with the process below
        process = subprocess.Popen(run, stdout=log, stderr=subprocess.STDOUT)
        started.append((process, log))
        return process

    yield start
    for process, log in started:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def check(page, name: str) -> None:
    assert_accessible(page)
    screenshot(page, name)


def test_an_owner_signs_up_enrols_a_shed_sets_its_policy_and_gets_paid(portal, agent, browser_page, tmp_path):
    page = browser_page
    # The Content-Security-Policy allows no inline script or style: the browser reports any it blocked.
    blocked = []
    page.on("console", lambda message: "Content Security Policy" in message.text and blocked.append(message.text))

    # Sign up.
    page.goto(f"{portal}/accounts/signup/")
    check(page, "01-sign-up")
    page.get_by_label("Username:").fill("gardener")
    page.get_by_label("Email address:").fill("gardener@example.com")
    page.get_by_label("Password:", exact=True).fill(PASSWORD)
    page.get_by_label("Confirm password:").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("My units")
    check(page, "02-no-units-yet")

    # Register a unit: a country picker, then the one-time token and the commands.
    page.get_by_role("link", name="Register a unit").click()
    page.get_by_label("Name:", exact=True).fill("Garden shed")
    page.get_by_label("Country:", exact=True).select_option(label="Germany")
    check(page, "03-register")
    page.get_by_role("button", name="Register and get an enrolment token").click()
    token = page.locator("#enrolment-token").inner_text().strip()
    enrol_command = page.locator("#command-enrol").inner_text()
    assert f"--token {token}" in enrol_command and f"--url {portal}" in enrol_command
    expect(page.locator("#enrolment-status")).to_contain_text("Waiting for the agent to enrol")
    check(page, "04-enrolment-token")

    # The agent enrols and heartbeats; the page notices by itself.
    page.evaluate("window.notReloaded = true")
    agent(portal, token)
    expect(page.locator("#enrolment-status")).to_contain_text("Enrolled — online", timeout=30_000)
    assert page.evaluate("window.notReloaded") is True, "the status changed without a reload"
    screenshot(page, "05-enrolled")
    unit = Unit.objects.get(name="Garden shed")
    assert unit.owner.username == "gardener" and unit.gpus.count() == 2

    page.get_by_role("link", name="My units").first.click()
    row = page.get_by_role("row", name="Garden shed")
    expect(row).to_contain_text("Online")
    check(page, "06-units-online")

    # The policy: a validation error shown beside its field, then a good save.
    page.get_by_role("link", name="Garden shed").click()
    page.get_by_label(STOP).fill("70")
    page.get_by_label(RESUME).fill("80")
    page.get_by_role("button", name="Save policy").click()
    error = page.locator(".has-error").filter(has=page.get_by_label(RESUME))
    expect(error).to_contain_text("The resume threshold must be below the stop threshold (70 °C).")
    check(page, "07-policy-error")
    page.get_by_label(RESUME).fill("65")
    page.get_by_label(PRICE).fill("2.00")
    page.get_by_role("button", name="Save policy").click()
    expect(page.locator(".has-error")).to_have_count(0)
    unit.refresh_from_db()
    assert (unit.thermal_stop_c, unit.thermal_resume_c, unit.price_per_gpu_hour_micros) == (70, 65, 2_000_000)
    check(page, "08-policy-saved")

    # A renter's job runs on the shed; the owner's earnings show it.
    renter = user_make("rita-renter")
    wallet_credit_promotional(user=renter, amount_micros=50_000_000, key="browser-credit")
    _, api_key = api_key_create(user=renter, name="browser")
    submitted = httpx.post(
        f"{portal}/api/v1/jobs",
        headers={"Authorization": f"Bearer {api_key}"},
        json={
            "image": "docker.io/library/python:3.12-slim",
            "command": ["sleep", "3"],  # as root the agent runs it as nobody, who may not reach this Python
            "gpu_count": 2,
            "jurisdictions": ["DE"],
        },
        timeout=30,
    )
    assert submitted.status_code == 201, submitted.text
    job = wait_until(
        lambda: (job := Job.objects.get(pk=submitted.json()["id"])).state in ("succeeded", "failed") and job,
        timeout=60,
        what="the job to end",
    )
    assert job.state == "succeeded", (tmp_path / "agent.log").read_text()[-3000:]
    page.get_by_role("link", name="Earnings").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Earnings")
    earned = page.get_by_role("row").filter(has_text="Garden shed").filter(has_text=str(job.pk)[:8])
    expect(earned.first).to_be_visible()  # one line per posting of the job's usage
    assert "Owed to you" in page.content()
    check(page, "09-earnings")

    # Stripe Connect onboarding, against the local fake; the hosted page is Stripe's, faked here.
    page.route(STRIPE_HOSTED, lambda route: route.fulfill(content_type="text/html", body=STRIPE_PAGE))
    page.get_by_role("button", name="Set up payouts with Stripe").click()
    page.wait_for_url(STRIPE_HOSTED)
    account_id = BillingProfile.objects.get(user=unit.owner).stripe_account_id
    assert account_id and f"/{account_id}/" in page.url
    assert stripe_account(account_id)
    screenshot(page, "10-stripe-onboarding")
    page.goto(f"{portal}/portal/earnings/")
    expect(page.get_by_text("Onboarding incomplete.")).to_be_visible()
    expect(page.get_by_role("button", name="Continue Stripe onboarding")).to_be_visible()
    check(page, "11-onboarding-incomplete")
    assert blocked == []


STRIPE_PAGE = "<!doctype html><html lang=en><title>Stripe onboarding</title><h1>Stripe onboarding (local fake)</h1>"


def stripe_account(account_id: str) -> bool:
    from billing.stripe_api import client

    return client().v1.accounts.retrieve(account_id).id == account_id


def test_the_portal_works_with_javascript_disabled(portal, chromium, owner):
    context = chromium.new_context(java_script_enabled=False)
    page = context.new_page()
    try:
        log_in(page, portal, owner)
        page.get_by_role("link", name="Register a unit").click()
        page.get_by_label("Name:", exact=True).fill("Quiet shed")
        page.get_by_label("Country:", exact=True).select_option(label="France")
        page.get_by_role("button", name="Register and get an enrolment token").click()
        expect(page.locator("#enrolment-token")).not_to_be_empty()
        expect(page.locator("#enrolment-status")).to_contain_text("Waiting for the agent to enrol")

        page.get_by_role("link", name="Go to Quiet shed").click()
        page.get_by_label(PRICE).fill("-1")
        page.get_by_role("button", name="Save policy").click()
        expect(page.locator(".has-error").filter(has=page.get_by_label(PRICE))).to_be_visible()
        screenshot(page, "12-no-javascript-policy-error")

        page.get_by_role("link", name="Earnings").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Earnings")
        expect(page.locator("svg").first).to_be_visible()
        screenshot(page, "13-no-javascript-earnings")
    finally:
        context.close()


def log_in(page, portal: str, user) -> None:
    page.goto(f"{portal}/accounts/login/")
    page.get_by_label("Username:").fill(user.username)
    page.get_by_label("Password:").fill("pw-" + user.username)  # tests.conftest.user_make's password
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("My units")


def test_a_unit_can_be_registered_with_the_keyboard_alone(portal, browser_page, owner):
    page = browser_page
    log_in(page, portal, owner)
    page.goto(f"{portal}/portal/units/new/")

    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(20):  # past the header's links, in the order they are read
        if page.evaluate("document.activeElement.name") == "name":
            break
        page.keyboard.press("Tab")
    page.keyboard.type("Keyboard shed")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.name") == "country"
    page.keyboard.type("Netherlands")  # a select's type-ahead
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Register and get an enrolment token"
    page.keyboard.press("Enter")

    expect(page.get_by_role("heading", level=1)).to_have_text("Enrol Keyboard shed")
    assert Unit.objects.get(owner=owner, name="Keyboard shed").country.code == "NL"


# Every page a person can open, for the accessibility sweep below: (path, who is logged in). The
# unit's page is filled in with a unit that has GPUs, a running job and limits in force.
PAGES = [
    ("/accounts/login/", None),
    ("/accounts/signup/", None),
    ("/accounts/password-reset/", None),
    ("/accounts/password-reset/sent/", None),
    ("/accounts/password-reset/complete/", None),
    ("/accounts/profile/", "owner"),
    ("/accounts/password-change/", "owner"),
    ("/accounts/password-change/done/", "owner"),
    ("/portal/units/", "owner"),
    ("/portal/units/new/", "owner"),
    ("/portal/units/{unit}/", "owner"),
    ("/portal/earnings/", "owner"),
    ("/portal/payouts/return/", "owner"),
    ("/portal/jobs/", "renter"),
]


def test_every_page_passes_the_accessibility_check(portal, browser_page, owner, renter):
    unit, _ = unit_online(owner, name="Busy shed", gpus=2)
    Unit.objects.filter(pk=unit.pk).update(limits={"in_force": ["quiet_hours", "thermal"], "advertised_gpus": 1})
    job_place(job_id=job_make(renter, name="sweep-job").pk)
    page, people, logged_in = browser_page, {"owner": owner, "renter": renter}, None
    for path, who in PAGES:
        if who != logged_in:
            page.context.clear_cookies()
            if who:
                log_in(page, portal, people[who])
            logged_in = who
        response = page.goto(portal + path.format(unit=unit.pk))
        assert response.status == 200, path
        assert_accessible(page)
