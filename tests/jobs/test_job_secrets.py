"""Jobs' environment and renters' secrets: what a submit takes and refuses, /api/v1/secrets, the
agent's call for the values, sealing and key rotation, and that a value never shows anywhere
but in the answer to that call."""

import json

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from marketplace.accounts.models import Secret
from marketplace.accounts.secrets import secret_set
from marketplace.jobs.models import Job
from marketplace.jobs.placement import job_place
from marketplace.kernel import sealing
from marketplace.kernel.models import AuditEvent
from tests.conftest import JOB_SPEC, agent_client, job_make, problem_of, unit_online

pytestmark = pytest.mark.django_db

SECRETS = "/api/v1/secrets"
JOBS = "/api/v1/jobs"
AGENT = "/api/agent/v1"
VALUE = "hf_s3cr3t-V4lue-that-must-never-show"


def secrets_url(allocation) -> str:
    return f"{AGENT}/allocations/{allocation.pk}/secrets"


def pulled(agent):
    response = agent.get(f"{AGENT}/assignments/next")
    assert response.status_code == 200, response.content
    return response.json()


@pytest.fixture
def shed(owner):
    unit, credential = unit_online(owner, name="shed", gpus=2)
    return unit, agent_client(credential)


@pytest.fixture
def with_secret(renter):
    secret_set(owner=renter, name="hf-token", value=VALUE)
    return renter


class TestSecretsApi:
    def test_a_secret_is_set_listed_replaced_and_deleted_by_name_and_its_value_never_comes_back(self, renter_api):
        created = renter_api.put(f"{SECRETS}/hf-token", {"value": VALUE}, format="json")
        replaced = renter_api.put(f"{SECRETS}/hf-token", {"value": VALUE + "2"}, format="json")
        listed = renter_api.get(SECRETS)

        assert (created.status_code, replaced.status_code, listed.status_code) == (201, 200, 200)
        assert [row["name"] for row in listed.json()] == ["hf-token"]
        assert set(created.json()) == {"name", "created_at", "updated_at"}
        assert "no-store" in created["Cache-Control"]
        for response in (created, replaced, listed):
            assert VALUE not in response.content.decode()
        stored = Secret.objects.get(name="hf-token")
        assert VALUE not in stored.sealed and sealing.unseal(stored.sealed) == VALUE + "2"

        assert renter_api.delete(f"{SECRETS}/hf-token").status_code == 204
        assert not Secret.objects.exists()
        problem_of(renter_api.delete(f"{SECRETS}/hf-token"), 404)

    def test_each_renter_sees_and_deletes_only_their_own(self, renter_api, stranger_api, with_secret):
        assert stranger_api.get(SECRETS).json() == []
        problem_of(stranger_api.delete(f"{SECRETS}/hf-token"), 404)
        assert Secret.objects.filter(owner=with_secret).count() == 1

    @pytest.mark.parametrize(
        ("name", "body", "field"),
        [
            ("Upper", {"value": "x"}, "name"),
            ("a" * 65, {"value": "x"}, "name"),
            ("ok", {"value": ""}, "value"),
            ("ok", {"value": "x" * (32 * 1024 + 1)}, "value"),
            ("ok", {}, "value"),
            ("ok", {"value": "x", "extra": 1}, "extra"),
        ],
    )
    def test_bad_names_and_values_are_refused_clearly_without_echoing_the_value(self, renter_api, name, body, field):
        response = renter_api.put(f"{SECRETS}/{name}", body, format="json")

        problem = problem_of(response, 400)
        assert field in json.dumps(problem)
        value = body.get("value")
        if value and len(value) > 8:
            assert value not in response.content.decode()
        assert not Secret.objects.exists()

    def test_an_account_holds_at_most_its_limit(self, renter_api, settings):
        settings.SECRETS_PER_USER = 2
        for name in ("a1", "a2"):
            assert renter_api.put(f"{SECRETS}/{name}", {"value": "v"}, format="json").status_code == 201

        problem_of(renter_api.put(f"{SECRETS}/a3", {"value": "v"}, format="json"), 409)
        assert renter_api.put(f"{SECRETS}/a1", {"value": "w"}, format="json").status_code == 200  # a replacement

    def test_without_a_key_a_secret_is_refused_503_not_stored_in_the_clear(self, renter_api, settings):
        settings.SECRETS_KEYS = []

        problem_of(renter_api.put(f"{SECRETS}/hf-token", {"value": VALUE}, format="json"), 503)
        assert not Secret.objects.exists()

    def test_a_read_only_key_may_list_but_not_set(self, renter):
        from marketplace.accounts.services import api_key_create

        _, plaintext = api_key_create(user=renter, name="ro", scopes=["read"])
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")

        assert client.get(SECRETS).status_code == 200
        problem_of(client.put(f"{SECRETS}/hf-token", {"value": VALUE}, format="json"), 403)


class TestSubmit:
    def test_a_job_takes_env_and_secrets_by_name_and_shows_names_only(self, renter_api, with_secret):
        spec = {**JOB_SPEC, "env": {"EPOCHS": "3", "EMPTY": ""}, "secrets": {"HF_TOKEN": "hf-token"}}

        response = renter_api.post(JOBS, spec, format="json")

        assert response.status_code == 201, response.content
        body = response.json()
        assert body["env"] == {"EPOCHS": "3", "EMPTY": ""}
        assert body["secrets"] == {"HF_TOKEN": "hf-token"}
        assert VALUE not in response.content.decode()

    @pytest.mark.parametrize(
        ("extra", "field"),
        [
            ({"env": {"1BAD": "x"}}, "env"),
            ({"env": {"BAD-NAME": "x"}}, "env"),
            ({"env": {"CUDA_VISIBLE_DEVICES": "0"}}, "env"),
            ({"env": {"home": "/"}}, "env"),
            ({"env": {"SHEDSHARE_JOB_ID": "x"}}, "env"),
            ({"env": {"NVIDIA_VISIBLE_DEVICES": "all"}}, "env"),
            ({"env": {"A": "x" * (32 * 1024 + 1)}}, "env"),
            ({"env": {f"V{n}": "x" for n in range(65)}}, "env"),
            ({"env": {f"V{n}": "x" * 30000 for n in range(3)}}, "env"),
            ({"env": {"A": "nul\x00"}}, "NUL"),  # the parser refuses it before the fields
            ({"env": ["A=1"]}, "env"),
            ({"secrets": {"HF_TOKEN": "Not A Name"}}, "secrets"),
            ({"secrets": {"HOME": "hf-token"}}, "secrets"),
            ({"env": {"HF_TOKEN": "x"}, "secrets": {"HF_TOKEN": "hf-token"}}, "secrets"),
        ],
    )
    def test_bad_environments_are_refused_with_the_field_named(self, renter_api, with_secret, extra, field):
        response = renter_api.post(JOBS, {**JOB_SPEC, **extra}, format="json")

        problem = problem_of(response, 400)
        assert field in json.dumps(problem)
        assert not Job.objects.exists()

    def test_a_secret_the_renter_does_not_have_is_refused_even_if_another_renter_has_it(
        self, stranger_api, with_secret
    ):
        response = stranger_api.post(JOBS, {**JOB_SPEC, "secrets": {"HF_TOKEN": "hf-token"}}, format="json")

        problem = problem_of(response, 400)
        assert "hf-token" in problem["detail"] and "secret set" in problem["detail"]
        assert not Job.objects.exists()


class TestAgentGetsTheValues:
    def test_the_assignment_names_the_variables_and_the_agent_of_the_allocation_gets_the_values(
        self, shed, with_secret
    ):
        unit, agent = shed
        job = job_make(with_secret, env={"EPOCHS": "3"}, secrets={"HF_TOKEN": "hf-token"})
        allocation = job_place(job_id=job.pk)

        assignment = pulled(agent)
        response = agent.post(secrets_url(allocation), {}, format="json")

        assert assignment["job"]["env"] == {"EPOCHS": "3"}
        assert assignment["job"]["secrets"] == ["HF_TOKEN"]
        assert VALUE not in json.dumps(assignment)
        assert response.status_code == 200, response.content
        assert response.json() == {"env": {"HF_TOKEN": VALUE}}
        assert "no-store" in response["Cache-Control"]
        delivered = AuditEvent.objects.get(action="job.secrets_delivered", subject_id=job.pk)
        assert delivered.data["variables"] == ["HF_TOKEN"] and delivered.actor == f"unit:{unit.pk}"

    def test_another_units_agent_gets_a_404(self, owner, shed, with_secret):
        job = job_make(with_secret, secrets={"HF_TOKEN": "hf-token"})
        allocation = job_place(job_id=job.pk)
        _, credential = unit_online(owner, name="other", gpus=1)

        response = agent_client(credential).post(secrets_url(allocation), {}, format="json")

        problem_of(response, 404)
        assert VALUE not in response.content.decode()

    def test_a_cancelled_job_gets_a_409_and_no_values(self, renter, shed, with_secret):
        from marketplace.jobs.services import job_cancel

        _, agent = shed
        job = job_make(with_secret, secrets={"HF_TOKEN": "hf-token"})
        allocation = job_place(job_id=job.pk)
        pulled(agent)
        job_cancel(job=job, actor="test")

        response = agent.post(secrets_url(allocation), {}, format="json")

        problem_of(response, 409)
        assert VALUE not in response.content.decode()

    def test_a_secret_deleted_after_the_submit_fails_the_job_with_the_reason_and_gives_a_409(
        self, renter_api, shed, with_secret
    ):
        _, agent = shed
        job = job_make(with_secret, secrets={"HF_TOKEN": "hf-token"})
        allocation = job_place(job_id=job.pk)
        pulled(agent)
        assert renter_api.delete(f"{SECRETS}/hf-token").status_code == 204

        response = agent.post(secrets_url(allocation), {}, format="json")

        assert "hf-token" in problem_of(response, 409)["detail"]
        job.refresh_from_db()
        assert job.state == Job.State.FAILED and "hf-token" in job.failure_reason

    def test_a_secret_no_key_opens_fails_the_job_rather_than_leaving_it_waiting(self, shed, with_secret, settings):
        _, agent = shed
        job = job_make(with_secret, secrets={"HF_TOKEN": "hf-token"})
        allocation = job_place(job_id=job.pk)
        pulled(agent)
        settings.SECRETS_KEYS = [Fernet.generate_key().decode()]  # the old key dropped

        problem_of(agent.post(secrets_url(allocation), {}, format="json"), 409)
        job.refresh_from_db()
        assert job.state == Job.State.FAILED and "key" in job.failure_reason


class TestRotation:
    def test_rotation_reseals_with_the_newest_key_so_the_old_one_can_go(self, with_secret, settings):
        old = settings.SECRETS_KEYS[0]
        new = Fernet.generate_key().decode()
        settings.SECRETS_KEYS = [new, old]

        call_command("secrets_rotate")

        settings.SECRETS_KEYS = [new]
        assert sealing.unseal(Secret.objects.get().sealed) == VALUE

    def test_rotation_says_which_it_could_not_open(self, with_secret, settings):
        settings.SECRETS_KEYS = [Fernet.generate_key().decode()]

        with pytest.raises(CommandError, match="1 secret"):
            call_command("secrets_rotate")


def test_no_trace_of_a_value_in_the_audit_trail_the_admin_or_the_job(admin_client, renter_api, shed, with_secret):
    _, agent = shed
    response = renter_api.post(JOBS, {**JOB_SPEC, "secrets": {"HF_TOKEN": "hf-token"}}, format="json")
    job = Job.objects.get(pk=response.json()["id"])
    allocation = job_place(job_id=job.pk)
    pulled(agent)
    assert agent.post(secrets_url(allocation), {}, format="json").status_code == 200
    renter_api.put(f"{SECRETS}/hf-token", {"value": VALUE + "-new"}, format="json")

    secret = Secret.objects.get()
    pages = [
        admin_client.get("/admin/accounts/secret/"),
        admin_client.get(f"/admin/accounts/secret/{secret.pk}/change/"),
        admin_client.get(f"/admin/jobs/job/{job.pk}/change/"),
        renter_api.get(f"{JOBS}/{job.pk}"),
        renter_api.get(SECRETS),
    ]
    assert all(page.status_code == 200 for page in pages), [page.status_code for page in pages]
    for page in pages:
        assert VALUE not in page.content.decode()
        assert secret.sealed not in page.content.decode()
    audit = json.dumps(list(AuditEvent.objects.values("action", "actor", "data")), default=str)
    assert VALUE not in audit
    assert {"secret.created", "secret.replaced", "job.secrets_delivered"} <= set(
        AuditEvent.objects.values_list("action", flat=True)
    )


def test_a_key_that_is_not_a_fernet_key_fails_the_check_and_is_never_used(renter_api, settings):
    from marketplace.accounts.apps import secrets_keys_check

    settings.SECRETS_KEYS = ["not-a-key"]

    assert [error.id for error in secrets_keys_check(None)] == ["shedshare.E010"]
    problem_of(renter_api.put(f"{SECRETS}/hf-token", {"value": VALUE}, format="json"), 503)
    settings.SECRETS_KEYS, settings.DEBUG = [], False
    assert [error.id for error in secrets_keys_check(None)] == ["shedshare.W010"]


class TestPrivateImages:
    def start_url(self, allocation) -> str:
        return f"{AGENT}/allocations/{allocation.pk}/start"

    def test_the_registry_credential_goes_to_the_allocations_agent_only_and_the_digest_is_recorded(
        self, renter_api, shed, renter
    ):
        _, agent = shed
        secret_set(owner=renter, name="ghcr", value="robot:" + VALUE)
        response = renter_api.post(JOBS, {**JOB_SPEC, "registry_secret": "ghcr"}, format="json")
        job = Job.objects.get(pk=response.json()["id"])
        allocation = job_place(job_id=job.pk)

        assignment = pulled(agent)
        given = agent.post(secrets_url(allocation), {}, format="json")
        digest = "sha256:" + "ab" * 32
        started = agent.post(self.start_url(allocation), {"image_digest": digest}, format="json")

        assert response.json()["registry_secret"] == "ghcr" and VALUE not in response.content.decode()
        assert assignment["job"]["registry_auth"] is True and VALUE not in json.dumps(assignment)
        assert given.json() == {"env": {}, "registry": {"username": "robot", "password": VALUE}}
        assert started.status_code == 200, started.content
        assert renter_api.get(f"{JOBS}/{job.pk}").json()["placement"]["image_digest"] == digest
        assert AuditEvent.objects.get(action="job.started", subject_id=job.pk).data["image_digest"] == digest

    def test_a_registry_secret_the_renter_lacks_or_not_user_colon_password_is_refused_or_fails(
        self, renter_api, shed, renter
    ):
        _, agent = shed
        problem_of(renter_api.post(JOBS, {**JOB_SPEC, "registry_secret": "nope"}, format="json"), 400)
        problem_of(renter_api.post(JOBS, {**JOB_SPEC, "registry_secret": "Bad Name"}, format="json"), 400)
        secret_set(owner=renter, name="token-only", value=VALUE)
        job = job_make(renter, registry_secret="token-only")
        allocation = job_place(job_id=job.pk)
        pulled(agent)

        problem = problem_of(agent.post(secrets_url(allocation), {}, format="json"), 409)

        assert "USERNAME:PASSWORD" in problem["detail"] and VALUE not in json.dumps(problem)
        job.refresh_from_db()
        assert job.state == Job.State.FAILED and VALUE not in job.failure_reason

    def test_a_job_pinned_by_digest_starts_from_that_image_or_not_at_all(self, shed, renter):
        _, agent = shed
        pinned = "sha256:" + "cd" * 32
        job = job_make(renter, image=f"ghcr.io/acme/train@{pinned}")
        allocation = job_place(job_id=job.pk)
        pulled(agent)

        problem_of(agent.post(self.start_url(allocation), {"image_digest": "sha256:" + "ef" * 32}, format="json"), 409)
        problem_of(agent.post(self.start_url(allocation), {"image_digest": "latest"}, format="json"), 400)
        assert agent.post(self.start_url(allocation), {"image_digest": pinned}, format="json").status_code == 200
