"""Job templates at /api/v1/templates, and submits that start from one."""

import pytest

from marketplace.accounts.secrets import secret_set
from marketplace.jobs.models import Job, JobTemplate
from tests.conftest import JOB_SPEC, problem_of

pytestmark = pytest.mark.django_db

TEMPLATES = "/api/v1/templates"
JOBS = "/api/v1/jobs"
TRAIN = {**JOB_SPEC, "gpu_count": 2, "env": {"EPOCHS": "3"}, "jurisdictions": ["EU"], "max_price_per_gpu_hour": "2.5"}


class TestTemplates:
    def test_saved_listed_read_replaced_and_deleted_by_name(self, renter_api):
        created = renter_api.put(f"{TEMPLATES}/train", TRAIN, format="json")
        replaced = renter_api.put(f"{TEMPLATES}/train", {**TRAIN, "gpu_count": 4}, format="json")

        assert (created.status_code, replaced.status_code) == (201, 200), created.content
        assert [t["name"] for t in renter_api.get(TEMPLATES).json()] == ["train"]
        assert renter_api.get(f"{TEMPLATES}/train").json()["spec"] == {**TRAIN, "gpu_count": 4}
        assert renter_api.delete(f"{TEMPLATES}/train").status_code == 204
        problem_of(renter_api.get(f"{TEMPLATES}/train"), 404)

    def test_a_template_may_hold_some_fields_only_each_checked_as_a_submit_checks_it(self, renter_api):
        assert renter_api.put(f"{TEMPLATES}/eu-h100", {"gpu_models": ["h100"], "jurisdictions": ["EU"]},
                              format="json").status_code == 201  # fmt: skip

        for body, field in [
            ({"gpu_count": 99}, "gpu_count"),
            ({"env": {"HOME": "/"}}, "env"),
            ({"imagee": "x"}, "imagee"),
            ({"template": "other"}, "template"),
            ({"jurisdictions": ["XX-NOWHERE"]}, "jurisdictions"),
        ]:
            problem = problem_of(renter_api.put(f"{TEMPLATES}/bad", body, format="json"), 400)
            assert field in str(problem), problem
        problem_of(renter_api.put(f"{TEMPLATES}/Bad Name", TRAIN, format="json"), 400)
        problem_of(renter_api.put(f"{TEMPLATES}/list", ["not", "an", "object"], format="json"), 400)
        assert list(JobTemplate.objects.values_list("name", flat=True)) == ["eu-h100"]

    def test_each_renter_sees_only_their_own(self, renter_api, stranger_api):
        renter_api.put(f"{TEMPLATES}/train", TRAIN, format="json")

        assert stranger_api.get(TEMPLATES).json() == []
        problem_of(stranger_api.get(f"{TEMPLATES}/train"), 404)
        problem_of(stranger_api.delete(f"{TEMPLATES}/train"), 404)
        problem_of(stranger_api.post(JOBS, {"template": "train"}, format="json"), 400)
        assert not Job.objects.exists()

    def test_an_account_holds_at_most_its_limit(self, renter_api, settings):
        settings.JOB_TEMPLATES_PER_USER = 1
        renter_api.put(f"{TEMPLATES}/one", TRAIN, format="json")

        problem_of(renter_api.put(f"{TEMPLATES}/two", TRAIN, format="json"), 409)


class TestSubmitFromATemplate:
    def test_the_submits_fields_replace_the_templates_field_by_field(self, renter_api, renter):
        secret_set(owner=renter, name="hf-token", value="v")
        renter_api.put(f"{TEMPLATES}/train", {**TRAIN, "secrets": {"HF_TOKEN": "hf-token"}}, format="json")

        response = renter_api.post(JOBS, {"template": "train", "gpu_count": 1, "env": {"LR": "0.1"}}, format="json")

        assert response.status_code == 201, response.content
        job = Job.objects.get(pk=response.json()["id"])
        assert (job.image, job.gpu_count, job.env, job.secrets) == (
            JOB_SPEC["image"], 1, {"LR": "0.1"}, {"HF_TOKEN": "hf-token"}
        )  # fmt: skip
        assert job.jurisdictions == ["EU"] and job.max_price_per_gpu_hour_micros == 2_500_000

    def test_what_template_and_submit_make_together_is_checked_whole(self, renter_api):
        renter_api.put(f"{TEMPLATES}/eu", {"jurisdictions": ["EU"]}, format="json")

        problem = problem_of(renter_api.post(JOBS, {"template": "eu"}, format="json"), 400)
        assert "image" in str(problem) and "command" in str(problem)
        problem = problem_of(renter_api.post(JOBS, {"template": "missing", **JOB_SPEC}, format="json"), 400)
        assert "missing" in problem["detail"]
        problem_of(renter_api.post(JOBS, {"template": ["eu"], **JOB_SPEC}, format="json"), 400)
        assert not Job.objects.exists()
