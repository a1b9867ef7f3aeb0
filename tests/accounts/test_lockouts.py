"""Logins (the portal's and the admin's) lock out after repeated failures, and password reset is
limited, and unavailable without mail."""

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.core import mail
from django.test import Client
from django.utils import timezone

from tests.accounts.test_accounts import LOGIN, PASSWORD, RESET, logged_in_as
from tests.conftest import user_make

ADMIN_LOGIN = "/admin/login/"
pytestmark = pytest.mark.django_db


@pytest.fixture
def olivia():
    user = user_make("olivia-owner", email="olivia@example.com", is_staff=True)
    user.set_password(PASSWORD)
    user.save()
    return user


def attempt(client, path: str, password: str, *, username: str = "olivia-owner", address: str = "203.0.113.5"):
    return client.post(path, {"username": username, "password": password}, REMOTE_ADDR=address)


@pytest.mark.parametrize("path", [LOGIN, ADMIN_LOGIN])
def test_fifty_wrong_passwords_then_the_right_one_does_not_log_in(olivia, path):
    client = Client()
    statuses = {attempt(client, path, f"guess-{n}").status_code for n in range(50)}

    response = attempt(client, path, PASSWORD)

    assert statuses <= {200, 400, 429}
    assert response.status_code == 429
    assert logged_in_as(client) is None
    page = response.content.decode()
    assert "Logging in is locked" in page
    assert 1 <= int(response["Retry-After"]) <= 15 * 60


def test_the_lock_is_on_the_username_whatever_address_the_guesses_come_from(olivia, settings):
    client = Client()
    for n in range(settings.AXES_FAILURE_LIMIT):
        attempt(client, LOGIN, f"guess-{n}", address=f"198.51.100.{n}")

    assert attempt(client, LOGIN, PASSWORD, address="192.0.2.77").status_code == 429
    assert logged_in_as(client) is None


def test_the_lock_is_on_an_address_that_tries_many_usernames(olivia, settings):
    client = Client()
    for n in range(settings.AXES_FAILURE_LIMIT):
        attempt(client, LOGIN, "hunter2", username=f"someone-{n}")

    assert attempt(client, LOGIN, PASSWORD).status_code == 429
    assert attempt(client, LOGIN, PASSWORD, address="192.0.2.77").status_code == 302  # elsewhere, she logs in


def test_a_few_mistakes_do_not_lock(olivia, settings):
    client = Client()
    for n in range(settings.AXES_FAILURE_LIMIT - 1):
        assert attempt(client, LOGIN, f"typo-{n}").status_code == 400

    assert attempt(client, LOGIN, PASSWORD).status_code == 302
    assert logged_in_as(client) == "olivia-owner"


def test_the_lock_ends_after_the_cool_off(olivia, settings):
    client = Client()
    for n in range(settings.AXES_FAILURE_LIMIT):
        attempt(client, LOGIN, f"guess-{n}")
    assert attempt(client, LOGIN, PASSWORD).status_code == 429

    AccessAttempt.objects.update(attempt_time=timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(seconds=1))

    assert attempt(client, LOGIN, PASSWORD).status_code == 302


def test_choosing_a_new_password_through_the_mailed_link_lifts_the_lock(olivia, settings):
    client = Client()
    for n in range(settings.AXES_FAILURE_LIMIT):
        attempt(client, LOGIN, f"guess-{n}", address=f"198.51.100.{n}")
    client.post(RESET, {"email": "olivia@example.com"})
    link = mail.outbox[0].body.split("http://testserver", 1)[1].split()[0]
    set_password = client.get(link, follow=True).redirect_chain[-1][0]
    client.post(set_password, {"new_password1": "fresh-lawn-2210", "new_password2": "fresh-lawn-2210"})

    assert attempt(Client(), LOGIN, "fresh-lawn-2210").status_code == 302


class TestPasswordResetLimits:
    def test_each_email_address_gets_only_a_few_mails_an_hour(self, olivia, settings):
        client = Client()
        statuses = [client.post(RESET, {"email": "olivia@example.com"}).status_code for _ in range(5)]

        assert statuses == [302, 302, 302, 429, 429]
        assert len(mail.outbox) == 3

    def test_each_address_gets_only_a_few_requests_an_hour_whatever_the_email(self, olivia, settings):
        settings.PASSWORD_RESET_RATE_LIMIT = "4/hour"
        client = Client()
        for n in range(4):
            assert client.post(RESET, {"email": f"someone-{n}@example.com"}).status_code == 302

        response = client.post(RESET, {"email": "olivia@example.com"})

        assert response.status_code == 429
        assert "Too many reset requests" in response.content.decode()
        assert int(response["Retry-After"]) >= 1
        assert mail.outbox == []

    def test_without_mail_reset_is_unavailable_in_words_and_sends_nothing(self, olivia, settings):
        settings.MAIL_CONFIGURED = False
        client = Client()

        page, request = client.get(RESET), client.post(RESET, {"email": "olivia@example.com"})

        for response in (page, request):
            assert response.status_code == 503
            assert "Password reset is unavailable" in response.content.decode()
        assert mail.outbox == []
