"""The owner portal: list, register and inspect units, and issue enrolment tokens."""

import re

import pytest
from django.test import Client

from marketplace.kernel.errors import TokenExpired
from nodes.models import EnrolmentToken, Unit
from nodes.services import unit_enrol, unit_register
from tests.conftest import unit_online, user_make

UNITS = "/portal/units/"
REGISTER = "/portal/units/new/"
TOKEN_RE = re.compile(r"shs_enrol_[0-9a-f]{12}_[\w-]+")


def detail_url(unit) -> str:
    return f"/portal/units/{unit.pk}/"


def reissue_url(unit) -> str:
    return f"/portal/units/{unit.pk}/token/"


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def token_shown(response) -> str:
    found = set(TOKEN_RE.findall(response.content.decode()))
    assert len(found) == 1, found
    return found.pop()


@pytest.mark.parametrize("path", [UNITS, REGISTER, "/portal/units/00000000-0000-0000-0000-000000000000/"])
def test_the_portal_requires_login(db, path):
    response = Client().get(path)

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


def test_registering_without_login_creates_nothing(db):
    response = Client().post(REGISTER, {"name": "Garden shed", "country": "DE"})

    assert response.status_code == 302
    assert not Unit.objects.exists()


def test_an_owner_sees_only_their_own_units(owner, stranger):
    unit_register(owner=owner, name="Garden shed", country="DE")
    unit_online(owner, name="Garage", gpus=4)
    unit_register(owner=stranger, name="Neighbours shed", country="FR")

    response = logged_in(owner).get(UNITS)

    assert response.status_code == 200
    assert [unit.name for unit in response.context["units"]] == ["Garage", "Garden shed"]
    assert b"Neighbours shed" not in response.content
    assert b"0 / 4" in response.content


def test_the_register_page_shows_the_form(owner):
    response = logged_in(owner).get(REGISTER)

    assert response.status_code == 200
    assert b'name="subdivision"' in response.content


def test_registering_a_unit_shows_the_token_and_the_enrol_command(owner):
    response = logged_in(owner).post(REGISTER, {"name": "Garden shed", "country": "DE", "subdivision": "DE-BY"})

    assert response.status_code == 201
    unit = Unit.objects.get(owner=owner)
    assert (unit.name, unit.country.code, unit.subdivision, unit.status) == ("Garden shed", "DE", "DE-BY", "pending")
    token = token_shown(response)
    assert f"shedshare-agent enrol --url http://testserver --token {token}" in response.content.decode()
    enrolled, _ = unit_enrol(token=token, hostname="shed.local", agent_version="test")
    assert enrolled == unit


def test_sending_the_register_form_again_reaches_the_same_unit_with_a_fresh_token(owner):
    client = logged_in(owner)
    submission = client.get(REGISTER).context["form"]["submission"].value()
    form = {"name": "Garden shed", "country": "DE", "submission": submission}
    first = client.post(REGISTER, form)

    again = client.post(REGISTER, form)  # a reload of the token page, or a double click

    assert (first.status_code, again.status_code) == (201, 200)
    assert Unit.objects.filter(owner=owner).count() == 1
    old, new = token_shown(first), token_shown(again)
    assert old != new
    with pytest.raises(TokenExpired):
        unit_enrol(token=old, hostname="shed.local", agent_version="test")
    assert unit_enrol(token=new, hostname="shed.local", agent_version="test")[0] == Unit.objects.get(owner=owner)

    again_after_enrolment = client.post(REGISTER, form)  # the unit has an agent now: this is a new unit
    assert again_after_enrolment.status_code == 201 and Unit.objects.filter(owner=owner).count() == 2


def test_another_owners_registration_form_registers_a_unit_of_ones_own(owner):
    stranger = user_make("stan-stranger")
    theirs = logged_in(stranger)
    submission = theirs.get(REGISTER).context["form"]["submission"].value()
    theirs.post(REGISTER, {"name": "Their shed", "country": "FR", "submission": submission})

    mine = logged_in(owner).post(REGISTER, {"name": "My shed", "country": "DE", "submission": submission})

    assert mine.status_code == 201
    assert Unit.objects.get(owner=owner).name == "My shed"


def test_the_token_is_not_shown_again(owner):
    client = logged_in(owner)
    client.post(REGISTER, {"name": "Garden shed", "country": "DE"})
    unit = Unit.objects.get(owner=owner)

    response = client.get(detail_url(unit))

    assert response.status_code == 200
    assert not TOKEN_RE.search(response.content.decode())


@pytest.mark.parametrize(
    "form, field",
    [
        pytest.param({"name": "Shed", "country": "DE", "subdivision": "bavaria"}, "subdivision", id="not-iso"),
        pytest.param({"name": "Shed", "country": "DE", "subdivision": "FR-IDF"}, "subdivision", id="other-country"),
        pytest.param({"name": "Shed", "country": "XX"}, "country", id="unknown-country"),
        pytest.param({"country": "DE"}, "name", id="no-name"),
    ],
)
def test_an_invalid_form_shows_a_field_error(owner, form, field):
    response = logged_in(owner).post(REGISTER, form)

    assert response.status_code == 400
    assert field in response.context["form"].errors
    assert response.context["form"].errors[field][0] in response.content.decode().replace("&#x27;", "'")
    assert not Unit.objects.exists()
    assert not TOKEN_RE.search(response.content.decode())


def test_an_owner_sees_their_units_detail(owner):
    unit, _ = unit_online(owner, name="Garage", gpus=2)

    response = logged_in(owner).get(detail_url(unit))

    assert response.status_code == 200
    assert b"Garage" in response.content
    assert response.content.count(b"81920 MB") == 2


def test_another_owners_unit_is_a_404(owner, stranger):
    unit, _ = unit_register(owner=stranger, name="Neighbours shed", country="FR")

    response = logged_in(owner).get(detail_url(unit))

    assert response.status_code == 404
    assert b"Neighbours shed" not in response.content


def test_reissuing_a_token_shows_a_new_one_and_retires_the_old(owner):
    unit, old = unit_register(owner=owner, name="Garden shed", country="DE")

    response = logged_in(owner).post(reissue_url(unit))

    assert response.status_code == 200
    new = token_shown(response)
    assert new != old
    assert EnrolmentToken.objects.filter(unit=unit).count() == 2
    enrolled, _ = unit_enrol(token=new, hostname="shed.local", agent_version="test")
    assert enrolled == unit


def test_reissuing_a_token_on_another_owners_unit_is_a_404(owner, stranger):
    unit, theirs = unit_register(owner=stranger, name="Neighbours shed", country="FR")

    response = logged_in(owner).post(reissue_url(unit))

    assert response.status_code == 404
    assert not TOKEN_RE.search(response.content.decode())
    assert EnrolmentToken.objects.filter(unit=unit).count() == 1
    enrolled, _ = unit_enrol(token=theirs, hostname="shed.local", agent_version="test")
    assert enrolled == unit


def test_reissuing_takes_a_post(owner):
    unit, _ = unit_register(owner=owner, name="Garden shed", country="DE")

    response = logged_in(owner).get(reissue_url(unit))

    assert response.status_code == 405
    assert EnrolmentToken.objects.filter(unit=unit).count() == 1


def test_reissuing_needs_a_csrf_token(owner):
    unit, _ = unit_register(owner=owner, name="Garden shed", country="DE")
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)

    response = client.post(reissue_url(unit))

    assert response.status_code == 403
    assert EnrolmentToken.objects.filter(unit=unit).count() == 1


def test_the_unit_page_says_which_backyard_limit_reduces_capacity(client, owner):
    from nodes.models import Unit
    from tests.conftest import unit_online

    unit, _ = unit_online(owner, name="quiet-shed", gpus=4)
    Unit.objects.filter(pk=unit.pk).update(
        limits={"in_force": ["quiet_hours", "thermal"], "advertised_gpus": 0, "gpus": 4}, power_budget_kw="9.5"
    )
    client.force_login(owner)

    page = client.get(f"/portal/units/{unit.pk}/").content.decode()

    assert "Capacity is reduced now" in page
    assert "0 of 4 GPUs offered" in page
    assert "Quiet hours" in page and "Temperature reached the 83 °C stop threshold" in page
    assert "9.50 kW" in page
