"""Accounts in the owner portal: sign-up, log in and out, password reset and change, profile."""

import re

import pytest
from django.contrib.auth import SESSION_KEY, get_user_model
from django.core import mail
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.test import Client

from marketplace.accounts import services
from tests.conftest import user_make

SIGNUP = "/accounts/signup/"
LOGIN = "/accounts/login/"
LOGOUT = "/accounts/logout/"
PROFILE = "/accounts/profile/"
RESET = "/accounts/password-reset/"
CHANGE = "/accounts/password-change/"
UNITS = "/portal/units/"
PASSWORD = "kettle-lawn-9417"
RESET_LINK_RE = re.compile(r"http://testserver(/accounts/password-reset/[\w-]+/[\w-]+/)")

User = get_user_model()


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def sign_up_form(**changes) -> dict:
    return {"username": "newt", "email": "newt@example.com", "password1": PASSWORD, "password2": PASSWORD, **changes}


def logged_in_as(client) -> str | None:
    """The username whose session the client carries, if any."""
    user_id = client.session.get(SESSION_KEY)
    return User.objects.get(pk=user_id).username if user_id else None


def assert_field_error(response, field: str) -> str:
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert field in errors, errors
    message = errors[field][0]
    assert message in response.content.decode().replace("&#x27;", "'").replace("&#8217;", "’")
    return message


class TestSignUp:
    def test_the_page_labels_every_field(self, db):
        response = Client().get(SIGNUP)

        assert response.status_code == 200
        page = response.content.decode()
        for field, label in [
            ("username", "Username"),
            ("email", "Email address"),
            ("password1", "Password"),
            ("password2", "Confirm password"),
        ]:
            assert f'<label for="id_{field}">{label}:</label>' in page

    def test_signing_up_logs_in_and_shows_the_units(self, db):
        client = Client()

        response = client.post(SIGNUP, sign_up_form())

        assert response.status_code == 302
        assert response["Location"] == UNITS
        user = User.objects.get(username="newt")
        assert (user.email, user.check_password(PASSWORD)) == ("newt@example.com", True)
        assert logged_in_as(client) == "newt"

    def test_a_logged_in_person_is_sent_to_their_units(self, owner):
        response = logged_in(owner).get(SIGNUP)

        assert response.status_code == 302
        assert response["Location"] == UNITS

    @pytest.mark.parametrize(
        "changes, field",
        [
            pytest.param({"username": "Olivia-Owner"}, "username", id="username-taken"),
            pytest.param({"email": "Olivia@Example.com"}, "email", id="email-taken-in-another-case"),
            pytest.param({"password2": PASSWORD + "x"}, "password2", id="passwords-differ"),
            pytest.param({"password1": "12345678", "password2": "12345678"}, "password2", id="weak-password"),
            pytest.param({"email": ""}, "email", id="no-email"),
        ],
    )
    def test_a_bad_form_shows_the_error_beside_its_field_and_creates_nobody(self, db, changes, field):
        user_make("olivia-owner", email="olivia@example.com")
        client = Client()

        response = client.post(SIGNUP, sign_up_form(**changes))

        assert_field_error(response, field)
        assert User.objects.count() == 1
        assert logged_in_as(client) is None


class TestLogInAndOut:
    def test_the_login_page_links_to_sign_up_and_password_reset(self, db):
        page = Client().get(LOGIN).content.decode()

        assert f'<a href="{SIGNUP}">Create an account</a>' in page
        assert f'<a href="{RESET}">Forgot your password?</a>' in page

    def test_a_wrong_password_shows_the_error(self, owner):
        client = Client()

        response = client.post(LOGIN, {"username": owner.username, "password": "wrong"})

        assert response.status_code == 400
        assert "Please enter a correct username and password" in response.content.decode()
        assert logged_in_as(client) is None

    def test_logging_in_shows_the_units(self, owner):
        client = Client()

        response = client.post(LOGIN, {"username": owner.username, "password": "pw-olivia-owner"})

        assert response.status_code == 302
        assert response["Location"] == UNITS
        assert logged_in_as(client) == owner.username

    def test_logging_out_takes_a_post(self, owner):
        client = logged_in(owner)

        assert client.get(LOGOUT).status_code == 405
        assert logged_in_as(client) == owner.username
        response = client.post(LOGOUT)

        assert response.status_code == 302
        assert response["Location"] == LOGIN
        assert logged_in_as(client) is None


class TestPasswordReset:
    def reset_link(self, client, email: str) -> str:
        response = client.post(RESET, {"email": email})
        assert response.status_code == 302
        assert response["Location"] == "/accounts/password-reset/sent/"
        assert len(mail.outbox) == 1
        message = mail.outbox[0]
        assert (message.subject, message.to) == ("Reset your Shedshare password", [email])
        links = RESET_LINK_RE.findall(message.body)
        assert len(links) == 1, message.body
        return links[0]

    def test_the_emailed_link_sets_a_new_password(self, db):
        user = user_make("olivia-owner", email="olivia@example.com")
        client = Client()
        link = self.reset_link(client, "olivia@example.com")

        form_page = client.get(link, follow=True)
        assert form_page.context["validlink"] is True
        response = client.post(form_page.redirect_chain[-1][0], {"new_password1": PASSWORD, "new_password2": PASSWORD})

        assert response.status_code == 302
        assert response["Location"] == "/accounts/password-reset/complete/"
        user.refresh_from_db()
        assert user.check_password(PASSWORD)
        logged_in = Client().post("/accounts/login/", {"username": "olivia-owner", "password": PASSWORD})
        assert logged_in.status_code == 302, logged_in.content

    def test_the_link_works_once(self, db):
        user_make("olivia-owner", email="olivia@example.com")
        client = Client()
        link = self.reset_link(client, "olivia@example.com")
        set_password = client.get(link, follow=True).redirect_chain[-1][0]
        client.post(set_password, {"new_password1": PASSWORD, "new_password2": PASSWORD})

        response = Client().get(link, follow=True)

        assert response.context["validlink"] is False
        assert "does not work any more" in response.content.decode()

    def test_an_unknown_address_sends_nothing_and_says_the_same(self, db):
        response = Client().post(RESET, {"email": "nobody@example.com"})

        assert response.status_code == 302
        assert response["Location"] == "/accounts/password-reset/sent/"
        assert mail.outbox == []


class TestPasswordChange:
    def test_a_logged_in_owner_changes_their_password(self, owner):
        client = logged_in(owner)
        form = {"old_password": "pw-olivia-owner", "new_password1": PASSWORD, "new_password2": PASSWORD}

        response = client.post(CHANGE, form)

        assert response.status_code == 302
        assert response["Location"] == "/accounts/password-change/done/"
        owner.refresh_from_db()
        assert owner.check_password(PASSWORD)
        assert logged_in_as(client) == owner.username

    def test_a_wrong_old_password_is_refused(self, owner):
        form = {"old_password": "wrong", "new_password1": PASSWORD, "new_password2": PASSWORD}

        response = logged_in(owner).post(CHANGE, form)

        assert_field_error(response, "old_password")
        owner.refresh_from_db()
        assert owner.check_password("pw-olivia-owner")


class TestProfile:
    def test_anonymous_visitors_are_sent_to_log_in(self, db):
        response = Client().get(PROFILE)

        assert response.status_code == 302
        assert response["Location"] == f"{LOGIN}?next={PROFILE}"

    def test_the_page_shows_the_username_and_the_password_change_link(self, owner):
        page = logged_in(owner).get(PROFILE).content.decode()

        assert "olivia-owner" in page
        assert f'<a href="{CHANGE}">' in page

    def test_saving_changes_only_the_callers_own_record(self, owner, stranger):
        client = logged_in(owner)

        response = client.post(PROFILE, {"first_name": "Olivia", "last_name": "Oak", "email": "olivia@example.com"})

        assert response.status_code == 302
        assert response["Location"] == PROFILE
        owner.refresh_from_db()
        stranger.refresh_from_db()
        assert (owner.first_name, owner.last_name, owner.email) == ("Olivia", "Oak", "olivia@example.com")
        assert (stranger.first_name, stranger.last_name, stranger.email) == ("", "", "")
        assert "Your profile is saved." in client.get(PROFILE).content.decode()

    def test_another_accounts_email_is_refused(self, owner):
        user_make("sam-stranger", email="sam@example.com")

        response = logged_in(owner).post(PROFILE, {"first_name": "Olivia", "email": "SAM@example.com"})

        assert_field_error(response, "email")
        owner.refresh_from_db()
        assert (owner.first_name, owner.email) == ("", "")

    def test_keeping_ones_own_email_is_fine(self, db):
        olivia = user_make("olivia-owner", email="olivia@example.com")

        response = logged_in(olivia).post(PROFILE, {"first_name": "Olivia", "email": "Olivia@example.com"})

        assert response.status_code == 302
        olivia.refresh_from_db()
        assert olivia.first_name == "Olivia"


def test_the_database_refuses_a_second_account_for_one_email_in_any_case(db):
    user_make("ann", email="Ann@Example.com")
    with pytest.raises(IntegrityError), transaction.atomic():
        user_make("anne", email="ann@example.COM")
    user_make("bob")
    user_make("bert")  # blank emails are not constrained


def test_a_sign_up_that_loses_a_race_for_an_email_gets_the_field_error(db, monkeypatch):
    user_make("ann", email="ann@example.com")
    checks = iter([False])  # the first check ran before the other sign-up committed
    real = services.email_in_use
    monkeypatch.setattr(services, "email_in_use", lambda email, exclude=None: next(checks, None) or real(email))
    with pytest.raises(ValidationError) as raised:
        services.user_sign_up(username="anne", email="ann@example.com", password="a-long-passphrase-1")
    assert raised.value.message_dict == {"email": [services.EMAIL_TAKEN]}
