"""The agent trades a one-time enrolment token for its node credential: POST /api/agent/v1/enrol."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.kernel import tokens
from nodes.models import EnrolmentToken, Unit
from nodes.services import enrolment_token_issue, unit_register
from tests.conftest import agent_client, problem_of

ENROL = "/api/agent/v1/enrol"
HEARTBEAT = "/api/agent/v1/heartbeat"


@pytest.fixture
def registered(owner):
    """A freshly registered unit and its enrolment token."""
    return unit_register(owner=owner, name="Garden shed", country="DE")


def enrol(token: str, **extra):
    return APIClient().post(
        ENROL, {"token": token, "hostname": "shed.local", "agent_version": "1.0", **extra}, format="json"
    )


def test_a_good_token_buys_a_node_credential(registered):
    unit, token = registered

    response = enrol(token)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["unit_id"] == str(unit.pk)
    assert body["credential"].startswith("shs_node_")
    assert body["heartbeat_interval_s"] > 0
    unit.refresh_from_db()
    assert unit.enrolled_at is not None
    assert unit.hostname == "shed.local"
    assert unit.agent_version == "1.0"
    assert EnrolmentToken.objects.get(unit=unit).used_at is not None


def test_the_credential_works_on_the_agent_api(registered):
    _, token = registered
    credential = enrol(token).json()["credential"]

    response = agent_client(credential).post(HEARTBEAT, {"gpus": []}, format="json")

    assert response.status_code == 200, response.content


def test_the_credential_is_stored_only_as_a_digest(registered):
    unit, token = registered

    credential = enrol(token).json()["credential"]

    unit.refresh_from_db()
    assert unit.credential_digest == tokens.token_digest(credential)
    stored = [str(value) for value in Unit.objects.filter(pk=unit.pk).values().get().values()]
    assert not any(credential in value for value in stored)
    tokens_stored = [str(value) for row in EnrolmentToken.objects.values() for value in row.values()]
    assert not any(token in value for value in tokens_stored)


def test_a_used_token_is_refused_with_409(registered):
    unit, token = registered
    first = enrol(token).json()["credential"]

    body = problem_of(enrol(token), 409)

    assert body["type"] == "/problems/token-used"
    unit.refresh_from_db()
    assert unit.credential_digest == tokens.token_digest(first)


def test_an_expired_token_is_refused_with_410(registered):
    unit, token = registered
    EnrolmentToken.objects.filter(unit=unit).update(expires_at=timezone.now() - timedelta(seconds=1))

    body = problem_of(enrol(token), 410)

    assert body["type"] == "/problems/token-expired"
    unit.refresh_from_db()
    assert unit.enrolled_at is None
    assert EnrolmentToken.objects.get(unit=unit).used_at is None


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda token: token[:-4] + "AAAA", id="wrong-secret"),
        pytest.param(lambda token: "shs_enrol_abcdef123456_" + "x" * 43, id="unknown-lookup"),
        pytest.param(lambda token: "not-a-token", id="malformed"),
        pytest.param(lambda token: token.replace("shs_enrol_", "shs_node_"), id="wrong-kind"),
        pytest.param(lambda token: "shs_enrol_", id="prefix-only"),
    ],
)
def test_a_wrong_token_is_refused_with_401(registered, mangle):
    unit, token = registered

    body = problem_of(enrol(mangle(token)), 401)

    assert body["type"] == "/problems/token-invalid"
    unit.refresh_from_db()
    assert unit.enrolled_at is None
    assert unit.credential_digest == ""


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({}, id="no-token"),
        pytest.param({"hostname": "shed.local"}, id="only-hostname"),
        pytest.param({"token": ""}, id="empty-token"),
        pytest.param({"token": ["shs_enrol_x"]}, id="token-not-a-string"),
        pytest.param({"token": "x" * 201}, id="token-too-long"),
        pytest.param({"token": "shs_enrol_x", "favourite": "colour"}, id="unknown-field"),
        pytest.param([], id="json-array"),
        pytest.param(None, id="json-null"),
    ],
)
def test_a_malformed_body_is_refused_with_400(registered, payload):
    response = APIClient().post(ENROL, payload, format="json")

    body = problem_of(response, 400)

    assert body["type"] == "/problems/validation-error"
    assert body["errors"]


def test_a_body_that_is_not_json_is_refused_with_400(registered):
    response = APIClient().post(ENROL, "token=abc", content_type="application/json")

    body = problem_of(response, 400)

    assert body["type"] == "/problems/parse-error"


def test_a_form_encoded_body_is_refused_with_415(registered):
    _, token = registered

    response = APIClient().post(ENROL, {"token": token})

    problem_of(response, 415)
    assert not EnrolmentToken.objects.filter(used_at__isnull=False).exists()


def test_a_retired_unit_cannot_enrol(registered):
    unit, token = registered
    Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.RETIRED)

    problem_of(enrol(token), 403)

    assert EnrolmentToken.objects.get(unit=unit).used_at is None


def test_reissuing_a_token_invalidates_the_unused_one(registered):
    unit, old = registered

    new = enrolment_token_issue(unit=unit)

    assert new != old
    problem_of(enrol(old), 410)
    assert enrol(new).status_code == 201


def test_enrolling_again_replaces_the_old_credential(registered):
    unit, token = registered
    old = enrol(token).json()["credential"]

    new = enrol(enrolment_token_issue(unit=unit)).json()["credential"]

    problem_of(agent_client(old).post(HEARTBEAT, {"gpus": []}, format="json"), 401)
    assert agent_client(new).post(HEARTBEAT, {"gpus": []}, format="json").status_code == 200
