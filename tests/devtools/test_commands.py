"""Operator commands print secrets once and refuse bad input with a readable message."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from marketplace.accounts.services import api_key_authenticate
from nodes.models import Unit
from nodes.services import unit_enrol

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().strip()


def test_api_key_prints_a_working_key_for_the_renter(renter):
    key = run("api_key", "--user", renter.username, "--name", "laptop", "--days", "30")

    found = api_key_authenticate(plaintext=key)
    assert found is not None and found.user == renter
    assert found.expires_at is not None
    assert key not in found.digest


def test_api_key_refuses_an_unknown_user():
    with pytest.raises(CommandError, match="No active user named 'nobody'"):
        run("api_key", "--user", "nobody")


def test_unit_token_registers_a_unit_whose_token_enrols(owner):
    token = run("unit_token", "--owner", owner.username, "--unit", "Shed", "--country", "de")

    unit, credential = unit_enrol(token=token, hostname="shed", agent_version="test")
    assert (unit.name, unit.country.code, unit.owner) == ("Shed", "DE", owner)
    assert credential.startswith("shs_node_")


def test_unit_token_reissues_for_an_existing_unit(owner):
    run("unit_token", "--owner", owner.username, "--unit", "Shed", "--country", "DE")
    run("unit_token", "--owner", owner.username, "--unit", "Shed", "--country", "DE")

    assert Unit.objects.filter(owner=owner, name="Shed").count() == 1


def test_unit_token_refuses_a_country_that_does_not_exist(owner):
    with pytest.raises(CommandError, match="not an ISO 3166-1"):
        run("unit_token", "--owner", owner.username, "--unit", "Shed", "--country", "XX")


def test_the_demo_refuses_to_run_without_debug(settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="DEBUG=true"):
        run("demo")
