"""Attacks on accounts and the production settings, against the real web server (gunicorn with
two worker processes, the production settings, the test database): brute force on logins and
enrolment, password reset without mail, limits spread over workers, state change by GET, and
the security headers."""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.sessions.models import Session

from billing.models import BillingProfile
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from nodes.models import Unit
from nodes.services import unit_register
from tests.conftest import user_make
from tests.e2e import free_port, stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PASSWORD = "kettle-lawn-9417"
# Another renter's request while an attack runs answers within this (a generous bound for a busy 2-core machine).
OTHERS_BOUND_S = 2.0
# gunicorn's access log line with the serving worker's pid first.
ACCESS_LOG_FORMAT = '%(p)s "%(r)s" %(s)s'


def web_start(tmp_path, **env) -> devstack.Stack:
    """The web server alone, as deployed: two worker processes. ``env`` overrides the end-to-end
    stack's; None removes a variable."""
    port = free_port()
    env = {name: value for name, value in {**stack_env(tmp_path / "data"), **env}.items() if value is not None}
    stack = devstack.Stack(env=env, log_dir=tmp_path / "logs")
    argv = devstack.web_argv(port, workers=2) + ["--access-logformat", ACCESS_LOG_FORMAT]
    stack.start("web", argv)
    stack.base_url = f"http://127.0.0.1:{port}"
    devstack.wait_http(f"{stack.base_url}/api/schema/", timeout=60)
    return stack


@pytest.fixture
def web(tmp_path):
    stack = web_start(tmp_path)
    yield stack
    stack.stop_all()


def person(username: str, **extra):
    """A user whose password the web server can check: the tests' own settings hash with MD5
    for speed, which the production settings do not accept."""
    user = user_make(username, **extra)
    user.password = PBKDF2PasswordHasher().encode(PASSWORD, PBKDF2PasswordHasher().salt())
    user.save()
    return user


class Browser:
    """A browser's form posts over plain HTTP. The production settings mark cookies Secure, which
    httpx would not send back over HTTP, so the CSRF cookie is carried by hand."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=10, follow_redirects=False)

    def form(self, path: str, data: dict, *, session: str = "", page: str = "") -> httpx.Response:
        """Fill in the form on ``page`` (``path`` itself by default) and post it to ``path``, as
        the session's owner when one is given."""
        cookies = [f"sessionid={session}"] if session else []
        page = self.http.get(page or path, headers={"Cookie": "; ".join(cookies)})
        assert page.status_code == 200, page.text
        csrf = re.search(r"csrftoken=([^;]+)", ";".join(page.headers.get_list("set-cookie")))
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        headers = {"Cookie": "; ".join(cookies + ([f"csrftoken={csrf.group(1)}"] if csrf else []))}
        return self.http.post(path, data={**data, "csrfmiddlewaretoken": token}, headers=headers)

    def log_in(self, username: str, password: str, *, path: str = "/accounts/login/") -> httpx.Response:
        return self.form(path, {"username": username, "password": password})


def session_cookie(response: httpx.Response) -> str | None:
    found = re.search(r"sessionid=([^;]+)", ";".join(response.headers.get_list("set-cookie")))
    return found.group(1) if found else None


def timed_get(base_url: str, path: str, key: str) -> float:
    started = time.monotonic()
    response = httpx.get(base_url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
def test_fifty_wrong_passwords_then_the_right_one_does_not_log_in(web, path):
    person("olivia-owner", is_staff=True)
    person("sam-staff", is_staff=True)
    _, other_key = api_key_create(user=user_make("rita-renter"), name="other")
    browser = Browser(web.base_url)
    # The right password works on this server, before any attack.
    assert session_cookie(Browser(web.base_url).log_in("sam-staff", PASSWORD, path=path))
    sessions = Session.objects.count()

    statuses = [browser.log_in("olivia-owner", f"guess-{n}", path=path).status_code for n in range(50)]
    slowest_other = timed_get(web.base_url, "/api/v1/jobs", other_key)
    right = browser.log_in("olivia-owner", PASSWORD, path=path)

    assert statuses[: settings.AXES_FAILURE_LIMIT - 1] == [400 if path.startswith("/accounts") else 200] * 4
    assert set(statuses[settings.AXES_FAILURE_LIMIT :]) == {429}
    assert right.status_code == 429
    assert "Logging in is locked" in right.text
    assert 1 <= int(right.headers["Retry-After"]) <= 15 * 60
    assert session_cookie(right) is None
    assert Session.objects.count() == sessions  # no session was stored for the attacker
    assert slowest_other < OTHERS_BOUND_S


def test_enrolment_brute_force_is_throttled_with_a_429_problem(tmp_path):
    stack = web_start(tmp_path, ENROL_FAILURE_LIMIT="5/hour")
    try:
        owner = person("olivia-owner")
        unit, token = unit_register(owner=owner, name="Garden shed", country="DE")
        _, other_key = api_key_create(user=user_make("rita-renter"), name="other")
        http = httpx.Client(base_url=stack.base_url, timeout=10)

        def enrol(guess: str) -> httpx.Response:
            return http.post("/api/agent/v1/enrol", json={"token": guess, "hostname": "x", "agent_version": "1"})

        guesses = [enrol(f"shs_enrol_{n:012d}_guess").status_code for n in range(30)]
        right = enrol(token)

        assert guesses[:5] == [401] * 5 and set(guesses[5:]) == {429}
        assert right.status_code == 429
        assert right.headers["Content-Type"].startswith("application/problem+json")
        body = right.json()
        assert (body["status"], body["type"]) == (429, "/problems/throttled")
        assert int(right.headers["Retry-After"]) >= 1
        assert Unit.objects.get(pk=unit.pk).enrolled_at is None  # nothing stored: the unit is not enrolled
        assert timed_get(stack.base_url, "/api/v1/jobs", other_key) < OTHERS_BOUND_S
    finally:
        stack.stop_all()


def test_password_reset_without_mail_is_unavailable_and_no_link_reaches_the_log(web):
    person("olivia-owner", email="olivia@example.com")
    browser = Browser(web.base_url)

    page = browser.http.get("/accounts/password-reset/")
    # The CSRF token from the login page: the reset page has no form to take it from.
    request = browser.form("/accounts/password-reset/", {"email": "olivia@example.com"}, page="/accounts/login/")

    for response in (page, request):
        assert response.status_code == 503
        assert "Password reset is unavailable" in response.text
    web.stop("web")  # the log is complete once the server has stopped
    log = web.log("web")
    assert "POST /accounts/password-reset/" in log
    assert not re.search(r"password-reset/[\w-]+/[\w-]+", log), log[-2000:]
    assert "Reset your Shedshare password" not in log


def test_limits_hold_across_the_web_workers(tmp_path):
    if not settings.CACHES["default"]["BACKEND"].endswith("RedisCache"):
        pytest.skip("needs Redis (set REDIS_URL): without it each web process counts on its own")
    stack = web_start(tmp_path, API_RATE_LIMIT="30/hour", API_KEYS_PER_USER="3")
    try:
        renter = user_make("rita-renter")
        keys = [api_key_create(user=renter, name=f"key {n}")[1] for n in range(3)]

        def call(n: int) -> int:
            # A fresh connection each time, so the requests spread over both workers.
            headers = {"Authorization": f"Bearer {keys[n % 3]}"}
            return httpx.get(f"{stack.base_url}/api/v1/jobs", headers=headers, timeout=10).status_code

        with ThreadPoolExecutor(max_workers=12) as pool:
            statuses = list(pool.map(call, range(75)))
        minted = httpx.post(
            f"{stack.base_url}/api/v1/api-keys",
            json={"name": "a fourth"},
            headers={"Authorization": f"Bearer {keys[0]}"},
        )
        stack.stop("web")
        workers = set(re.findall(r'^<(\d+)> "GET /api/v1/jobs', stack.log("web"), re.M))

        assert len(workers) == 2, "the requests did not reach both workers"
        assert statuses.count(200) == 30 and statuses.count(429) == 45
        # The renter cannot mint keys to raise the limit: the cap answers first (or the limit does).
        assert minted.status_code in (409, 429) and minted.headers["Content-Type"].startswith(
            "application/problem+json"
        )
        assert renter.api_keys.count() == 3
    finally:
        if stack.processes:
            stack.stop_all()


class FakeStripeServer:
    """The tests' Stripe fake over HTTP, for a web server in another process (STRIPE_API_BASE)."""

    def __init__(self) -> None:
        from tests.stripe_fake import FakeStripe

        self.fake = FakeStripe()
        fake = self.fake

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                url = f"http://stripe.local{self.path}"
                text, status, headers = fake.request(self.command, url, dict(self.headers), body)
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(text.encode() if isinstance(text, str) else text)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_get_of_the_connect_page_changes_nothing(tmp_path):
    stripe = FakeStripeServer()
    stack = web_start(tmp_path, STRIPE_SECRET_KEY="sk_test_fake", STRIPE_API_BASE=stripe.url)
    try:
        owner = person("olivia-owner")
        browser = Browser(stack.base_url)
        session = session_cookie(browser.log_in("olivia-owner", PASSWORD))
        assert session

        # As a cross-site link or image would: a GET with the owner's cookies.
        response = browser.http.get("/portal/payouts/connect/", headers={"Cookie": f"sessionid={session}"})

        assert response.status_code == 200
        assert '<form method="post" action="/portal/payouts/connect/">' in response.text
        assert stripe.fake.objects("account") == []
        assert not BillingProfile.objects.filter(user=owner).exclude(stripe_account_id="").exists()

        # The page's button (a POST with the CSRF token) is what creates the account.
        posted = browser.form("/portal/payouts/connect/", {}, session=session)
        assert posted.status_code == 302, posted.text
        assert len(stripe.fake.objects("account")) == 1
    finally:
        stack.stop_all()
        stripe.close()


def test_https_hsts_csp_and_secure_cookies_are_on_with_the_production_settings(tmp_path):
    # As deployed behind a TLS-terminating proxy: no plain-HTTP switches.
    stack = web_start(tmp_path, SECURE_SSL_REDIRECT=None, SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto")
    try:
        plain = httpx.get(f"{stack.base_url}/accounts/login/", timeout=10)
        assert plain.status_code == 301
        assert plain.headers["Location"] == f"https://127.0.0.1:{stack.base_url.rsplit(':', 1)[1]}/accounts/login/"

        secure = httpx.get(f"{stack.base_url}/accounts/login/", headers={"X-Forwarded-Proto": "https"}, timeout=10)
        assert secure.status_code == 200
        assert secure.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
        policy = secure.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "style-src 'self'" in policy and "unsafe-inline" not in policy
        csrf = next(c for c in secure.headers.get_list("set-cookie") if c.startswith("csrftoken="))
        assert "Secure" in csrf
        assert secure.headers["X-Content-Type-Options"] == "nosniff"
    finally:
        stack.stop_all()
