"""`manage.py bootstrap`, which compose runs on every start: logins and a renter key made once and
printed the same each time, the credit given once, a fresh enrolment token each time."""

import json
import stat
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from billing.models import LedgerTransaction
from billing.selectors import wallet_balance_micros
from marketplace.accounts.models import ApiKey
from marketplace.accounts.services import api_key_authenticate
from nodes.models import Unit
from nodes.services import unit_enrol

pytestmark = pytest.mark.django_db


def bootstrap(tmp_path) -> str:
    out = StringIO()
    call_command("bootstrap", token_file=tmp_path / "enrolment" / "token", state_file=tmp_path / "state.json",
                 url="http://shed.example:8000/", stdout=out)  # fmt: skip
    return out.getvalue()


def test_it_makes_logins_a_unit_and_a_renter_key_that_work(tmp_path):
    printed = bootstrap(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    for role in ("admin", "owner", "renter"):
        assert get_user_model().objects.get(username=role).check_password(state["passwords"][role])
        assert f"{role} / {state['passwords'][role]}" in printed
    assert get_user_model().objects.get(username="admin").is_superuser
    key = api_key_authenticate(plaintext=state["api_key"])
    assert key.user.username == "renter"
    assert wallet_balance_micros(key.user) == 100_000_000
    assert f"export SHEDSHARE_URL=http://shed.example:8000 SHEDSHARE_API_KEY={state['api_key']}" in printed
    token = (tmp_path / "enrolment" / "token").read_text().strip()
    unit, _ = unit_enrol(token=token, hostname="compose", agent_version="test")
    assert (unit.name, unit.country, unit.owner.username) == ("Compose shed", "DE", "owner")
    for path in (tmp_path / "state.json", tmp_path / "enrolment" / "token"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_second_run_keeps_what_the_first_made_and_issues_a_new_token(tmp_path):
    first = bootstrap(tmp_path)
    first_token = (tmp_path / "enrolment" / "token").read_text()
    second = bootstrap(tmp_path)
    assert second == first
    assert (tmp_path / "enrolment" / "token").read_text() != first_token
    assert ApiKey.objects.filter(user__username="renter").count() == 1
    assert LedgerTransaction.objects.filter(kind="promotion").count() == 1
    assert Unit.objects.count() == 1


def test_a_revoked_renter_key_is_replaced(tmp_path):
    bootstrap(tmp_path)
    ApiKey.objects.update(revoked_at="2020-01-01T00:00:00Z")
    printed = bootstrap(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    assert api_key_authenticate(plaintext=state["api_key"]) is not None
    assert state["api_key"] in printed
