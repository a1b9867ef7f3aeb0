"""Self-service API keys at /api/v1/api-keys, and the scopes they carry."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.accounts.models import ApiKey
from marketplace.accounts.services import ApiKeyLimitReached, api_key_authenticate, api_key_create, api_key_revoke
from marketplace.jobs.models import Job
from marketplace.kernel.models import AuditEvent
from marketplace.kernel.tokens import token_digest
from tests.conftest import JOB_SPEC, job_make, problem_of

KEYS = "/api/v1/api-keys"
pytestmark = pytest.mark.django_db


def key_client(plaintext: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


def scoped_client(user, *scopes: str) -> APIClient:
    _, plaintext = api_key_create(user=user, name="scoped", scopes=scopes)
    return key_client(plaintext)


@pytest.fixture
def renter_session(renter):
    client = APIClient()
    client.force_login(renter)
    return client


class TestCreate:
    def test_shows_the_key_once_and_stores_only_its_digest(self, renter_api, renter):
        response = renter_api.post(KEYS, {"name": "laptop", "scopes": ["read"], "expires_in_days": 7}, format="json")

        assert response.status_code == 201, response.content
        body = response.json()
        key = ApiKey.objects.get(pk=body["id"])
        assert key.user == renter
        assert body["key"].startswith(f"shs_live_{key.lookup}_")
        assert body["prefix"] == f"shs_live_{key.lookup}"
        assert key.digest == token_digest(body["key"]) and body["key"] not in key.digest
        assert "digest" not in body
        assert (key.name, key.scopes, body["scopes"]) == ("laptop", ["read"], ["read"])
        assert timedelta(days=6, hours=23) < key.expires_at - timezone.now() <= timedelta(days=7)
        assert api_key_authenticate(plaintext=body["key"]) == key

    def test_scopes_default_to_all(self, renter_api):
        response = renter_api.post(KEYS, {"name": "ci"}, format="json")

        assert response.json()["scopes"] == ["read", "submit", "billing"]
        assert response.json()["expires_at"] is None

    @pytest.mark.parametrize(
        "payload",
        [{"name": "x", "scopes": ["admin"]}, {"name": "x", "scopes": []}, {}, {"name": "x", "expires_in_days": 0}],
    )
    def test_invalid_requests_are_validation_problems(self, renter_api, payload):
        body = problem_of(renter_api.post(KEYS, payload, format="json"), 400)

        assert body["type"] == "/problems/validation-error"
        assert ApiKey.objects.count() == 1  # only the fixture's key

    def test_a_narrowed_key_cannot_mint_a_wider_one(self, renter):
        body = problem_of(scoped_client(renter, "read", "submit").post(KEYS, {"name": "wider"}, format="json"), 403)

        assert "billing" in body["detail"]
        assert ApiKey.objects.filter(user=renter).count() == 1

    def test_a_session_login_can_create_keys(self, renter_session, renter):
        assert renter_session.post(KEYS, {"name": "web"}, format="json").status_code == 201
        assert ApiKey.objects.filter(user=renter, name="web").exists()

    def test_the_management_command_still_prints_a_working_key(self, renter, capsys):
        call_command("api_key", user=renter.username, name="cmd")

        plaintext = capsys.readouterr().out.strip()
        assert api_key_authenticate(plaintext=plaintext).scopes == ["read", "submit", "billing"]


class TestList:
    def test_lists_only_your_own_keys_and_never_a_digest_or_key(self, renter_api, renter, stranger):
        api_key_create(user=stranger, name="theirs")
        api_key_create(user=renter, name="second")

        response = renter_api.get(KEYS)

        assert response.status_code == 200, response.content
        rows = response.json()["results"]
        assert sorted(row["name"] for row in rows) == ["second", "tests"]
        assert all(set(row) == {*ROW_FIELDS} for row in rows)
        digests = ApiKey.objects.values_list("digest", flat=True)
        assert not any(digest in response.content.decode() for digest in digests)


ROW_FIELDS = ["id", "name", "prefix", "lookup", "scopes", "created_at", "expires_at", "last_used_at", "revoked_at"]


class TestRevoke:
    def test_revoking_stops_the_key_and_is_idempotent(self, renter_api, renter):
        key, plaintext = api_key_create(user=renter, name="old")

        assert renter_api.delete(f"{KEYS}/{key.pk}").status_code == 204
        revoked_at = ApiKey.objects.get(pk=key.pk).revoked_at
        assert renter_api.delete(f"{KEYS}/{key.pk}").status_code == 204

        assert revoked_at is not None and ApiKey.objects.get(pk=key.pk).revoked_at == revoked_at
        assert AuditEvent.objects.filter(action="api_key.revoked", subject_id=key.pk).count() == 1
        body = problem_of(key_client(plaintext).get("/api/v1/jobs"), 401)
        assert "revoked" in body["detail"]

    def test_another_users_key_is_a_404_and_stays_alive(self, renter_api, stranger):
        theirs, plaintext = api_key_create(user=stranger, name="theirs")

        problem_of(renter_api.delete(f"{KEYS}/{theirs.pk}"), 404)

        assert ApiKey.objects.get(pk=theirs.pk).revoked_at is None
        assert key_client(plaintext).get("/api/v1/jobs").status_code == 200

    def test_an_expired_key_is_a_401_problem(self, renter):
        _, plaintext = api_key_create(user=renter, name="old", expires_at=timezone.now() - timedelta(seconds=1))

        problem_of(key_client(plaintext).get("/api/v1/jobs"), 401)


class TestScopes:
    def test_read_is_needed_for_safe_methods(self, renter):
        body = problem_of(scoped_client(renter, "submit").get("/api/v1/jobs"), 403)

        assert body["type"] == "/problems/scope-missing"
        assert "'read'" in body["detail"]
        assert scoped_client(renter, "read").get("/api/v1/jobs").status_code == 200

    def test_submit_is_needed_to_submit_a_job(self, renter):
        body = problem_of(scoped_client(renter, "read", "billing").post("/api/v1/jobs", JOB_SPEC, format="json"), 403)

        assert "'submit'" in body["detail"]
        assert not Job.objects.exists()
        assert scoped_client(renter, "submit").post("/api/v1/jobs", JOB_SPEC, format="json").status_code == 201

    def test_submit_is_needed_to_cancel_a_job(self, renter):
        job = job_make(renter)

        body = problem_of(scoped_client(renter, "read").post(f"/api/v1/jobs/{job.pk}/cancel"), 403)

        assert "'submit'" in body["detail"]
        job.refresh_from_db()
        assert job.state == Job.State.QUEUED
        assert scoped_client(renter, "read", "submit").post(f"/api/v1/jobs/{job.pk}/cancel").status_code == 200

    def test_billing_is_needed_to_top_up(self, renter, stripe_fake):
        body = problem_of(scoped_client(renter, "read", "submit").post("/api/v1/top-ups", {"amount": "10"}), 403)

        assert "'billing'" in body["detail"]
        assert not stripe_fake.objects("payment_intent")
        assert (
            scoped_client(renter, "billing").post("/api/v1/top-ups", {"amount": "10"}, format="json").status_code == 201
        )

    def test_a_session_login_has_every_scope(self, renter_session):
        assert renter_session.get("/api/v1/jobs").status_code == 200
        assert renter_session.post("/api/v1/jobs", JOB_SPEC, format="json").status_code == 201


class TestKeysPerAccount:
    def test_one_key_over_the_cap_is_a_409_problem_and_stores_nothing(self, renter, renter_api, settings):
        settings.API_KEYS_PER_USER = 3  # renter_api holds one already
        assert [renter_api.post(KEYS, {"name": f"k{n}"}, format="json").status_code for n in range(2)] == [201, 201]

        response = renter_api.post(KEYS, {"name": "one-too-many"}, format="json")

        body = problem_of(response, 409)
        assert body["type"] == "/problems/api-key-limit-reached"
        assert "revoke one" in body["detail"]
        assert ApiKey.objects.filter(user=renter).count() == 3

    def test_revoked_and_expired_keys_free_their_place(self, renter, settings):
        settings.API_KEYS_PER_USER = 2
        revoked, _ = api_key_create(user=renter, name="old")
        api_key_revoke(key=revoked)
        api_key_create(user=renter, name="expired", expires_at=timezone.now() - timedelta(seconds=1))
        api_key_create(user=renter, name="live")

        api_key_create(user=renter, name="second live")
        with pytest.raises(ApiKeyLimitReached):
            api_key_create(user=renter, name="third live")

    def test_the_cap_is_per_account(self, renter, stranger, settings):
        settings.API_KEYS_PER_USER = 1
        api_key_create(user=renter, name="renter's")

        api_key_create(user=stranger, name="stranger's")


def test_the_answer_that_carries_the_key_may_not_be_stored(renter_api):
    response = renter_api.post(KEYS, {"name": "ci"}, format="json")

    assert response.status_code == 201
    assert "no-store" in response["Cache-Control"]
    assert "no-store" not in renter_api.get(KEYS).get("Cache-Control", "")
