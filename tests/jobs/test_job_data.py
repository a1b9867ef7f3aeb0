"""A job's data on the server: what a submit takes and refuses, the assignment, the agent's
staging reports, how a failed staging ends the job, and the residency record's data lines."""

import json

import pytest

from marketplace.jobs.models import Job
from marketplace.jobs.placement import job_place
from marketplace.kernel.models import AuditEvent
from tests.conftest import JOB_SPEC, agent_client, job_make, problem_of, unit_online

pytestmark = pytest.mark.django_db

JOBS = "/api/v1/jobs"
AGENT = "/api/agent/v1"
SIGNED = "?X-Amz-Signature=abcdef&X-Amz-Expires=600"
INPUT = {"url": f"https://s3.eu-central-1.example.com/bucket/data.csv{SIGNED}", "path": "data.csv",
         "jurisdiction": "DE", "sha256": "a" * 64, "size": 12}  # fmt: skip
OUTPUT = {"url": f"https://s3.eu-central-1.example.com/bucket/model.bin{SIGNED}", "path": "model.bin",
          "jurisdiction": "DE-HE"}  # fmt: skip
DATA_JOB = {**JOB_SPEC, "jurisdictions": ["DE"], "inputs": [INPUT], "outputs": [OUTPUT]}


@pytest.fixture
def shed(owner):
    unit, credential = unit_online(owner, name="shed", country="DE", gpus=1)
    return unit, agent_client(credential)


@pytest.fixture
def picked_up(shed, renter):
    unit, agent = shed
    job = job_make(renter, **{k: v for k, v in DATA_JOB.items() if k not in JOB_SPEC})
    allocation = job_place(job_id=job.pk)
    assignment = agent.get(f"{AGENT}/assignments/next").json()
    return job, allocation, agent, assignment


def staging(agent, allocation, **report):
    body = {"phase": "in", "ok": True, "files": [], "seconds": 1.5, **report}
    return agent.post(f"{AGENT}/allocations/{allocation.pk}/staging", body, format="json")


class TestSubmit:
    def test_inputs_and_outputs_in_the_jobs_jurisdictions_are_taken_and_shown(self, renter_api):
        response = renter_api.post(JOBS, DATA_JOB, format="json")

        assert response.status_code == 201, response.content
        assert response.json()["inputs"] == [INPUT] and response.json()["outputs"] == [OUTPUT]

    @pytest.mark.parametrize(
        ("change", "field", "words"),
        [
            ({"inputs": [{**INPUT, "jurisdiction": "FR"}]}, "inputs", "FR"),
            ({"outputs": [{**OUTPUT, "jurisdiction": "US"}]}, "outputs", "US"),
            ({"inputs": [{**INPUT, "jurisdiction": "EU"}]}, "inputs", "not a set"),
            ({"inputs": [{**INPUT, "jurisdiction": "XX"}]}, "inputs", "XX"),
            ({"inputs": [{**INPUT, "url": "http://s3.example.com/a"}]}, "inputs", "HTTPS"),
            ({"inputs": [{**INPUT, "url": "https://127.0.0.1/a"}]}, "inputs", "loopback"),
            ({"inputs": [{**INPUT, "url": "https://10.1.2.3/a"}]}, "inputs", "private"),
            ({"inputs": [{**INPUT, "url": "https://user:pw@s3.example.com/a"}]}, "inputs", "password"),
            ({"inputs": [{**INPUT, "path": "../etc/passwd"}]}, "inputs", "relative path"),
            ({"inputs": [{**INPUT, "path": "/etc/passwd"}]}, "inputs", "relative path"),
            ({"outputs": [{**OUTPUT, "path": "a/../../b"}]}, "outputs", "relative path"),
            ({"inputs": [INPUT, INPUT]}, "inputs", "twice"),
            ({"inputs": [{**INPUT, "sha256": "xyz"}]}, "inputs", "sha256"),
            ({"inputs": [{**INPUT, "size": -1}]}, "inputs", "size"),
            ({"inputs": [{k: v for k, v in INPUT.items() if k != "jurisdiction"}]}, "inputs", "jurisdiction"),
            ({"inputs": [INPUT] * 65}, "inputs", "64"),
        ],
    )
    def test_data_the_job_may_not_move_is_refused_with_the_field_named(self, renter_api, change, field, words):
        problem = problem_of(renter_api.post(JOBS, {**DATA_JOB, **change}, format="json"), 400)

        assert field in json.dumps(problem) and words in json.dumps(problem), problem
        assert not Job.objects.exists()

    def test_without_jurisdictions_data_may_be_anywhere_and_a_test_store_may_be_allowed(self, renter_api, settings):
        anywhere = {**DATA_JOB, "jurisdictions": [], "inputs": [{**INPUT, "jurisdiction": "US"}]}
        assert renter_api.post(JOBS, anywhere, format="json").status_code == 201

        settings.JOB_DATA_PRIVATE_HOSTS = ["127.0.0.1:9000"]
        local = {**DATA_JOB, "inputs": [{**INPUT, "url": "http://127.0.0.1:9000/bucket/a"}]}
        assert renter_api.post(JOBS, local, format="json").status_code == 201
        other_port = {**DATA_JOB, "inputs": [{**INPUT, "url": "http://127.0.0.1:9001/bucket/a"}]}
        problem_of(renter_api.post(JOBS, other_port, format="json"), 400)


class TestStaging:
    def test_the_assignment_carries_the_data_and_reports_are_recorded_with_the_declared_endpoints(
        self, renter_api, picked_up
    ):
        job, allocation, agent, assignment = picked_up

        response = staging(agent, allocation, files=[{"path": "data.csv", "size": 12, "sha256": "a" * 64}])

        assert assignment["job"]["inputs"] == [INPUT] and assignment["job"]["outputs"] == [OUTPUT]
        assert response.status_code == 200, response.content
        event = AuditEvent.objects.get(action="job.staged_in", subject_id=job.pk)
        [staged] = event.data["files"]
        assert staged["endpoint"] == "https://s3.eu-central-1.example.com/bucket/data.csv"  # no signature
        assert (staged["jurisdiction"], staged["size"], event.data["seconds"]) == ("DE", 12, 1.5)
        record = renter_api.get(f"{JOBS}/{job.pk}/residency").json()["data"]
        assert record["inputs"]["declared"] == [{"path": "data.csv", "endpoint": staged["endpoint"],
                                                 "jurisdiction": "DE"}]  # fmt: skip
        assert record["inputs"]["staged"][0]["files"] == [staged] and record["inputs"]["staged"][0]["ok"]
        assert "X-Amz-Signature" not in json.dumps(record)

    def test_a_path_the_job_did_not_declare_another_units_agent_and_an_ended_allocation_are_refused(
        self, owner, picked_up
    ):
        job, allocation, agent, _ = picked_up
        _, other = unit_online(owner, name="other", gpus=1)

        problem_of(staging(agent, allocation, files=[{"path": "other.csv", "size": 1, "sha256": "b" * 64}]), 422)
        problem_of(staging(agent, allocation, phase="out", files=[{"path": "data.csv", "size": 1,
                                                                  "sha256": "b" * 64}]), 422)  # fmt: skip
        problem_of(staging(agent_client(other), allocation), 404)
        problem_of(staging(agent, allocation, ok=False), 400)  # a failure without its reason
        problem_of(staging(agent, allocation, reason="made-up", ok=False), 400)
        from marketplace.jobs.services import job_cancel

        job_cancel(job=job, actor="test")
        agent.post(f"{AGENT}/allocations/{allocation.pk}/finish", {"exit_code": None, "reason": "cancelled"},
                   format="json")  # fmt: skip
        problem_of(staging(agent, allocation), 409)

    def test_an_output_that_failed_to_upload_fails_the_job_even_if_it_exited_0(self, picked_up):
        job, allocation, agent, _ = picked_up
        agent.post(f"{AGENT}/allocations/{allocation.pk}/start", {}, format="json")
        staging(agent, allocation, phase="out", ok=False, reason="expired", detail="model.bin: 403 from the storage")

        agent.post(f"{AGENT}/allocations/{allocation.pk}/finish", {"exit_code": 0, "reason": "stage_out_failed"},
                   format="json")  # fmt: skip

        job.refresh_from_db()
        assert job.state == Job.State.FAILED
        assert job.failure_reason == "stage_out_failed (expired: model.bin: 403 from the storage)"

    def test_an_input_that_could_not_be_fetched_fails_the_job_with_the_reason(self, picked_up):
        job, allocation, agent, _ = picked_up
        staging(agent, allocation, ok=False, reason="checksum", detail="data.csv: SHA-256 is not the declared one")

        agent.post(f"{AGENT}/allocations/{allocation.pk}/finish", {"exit_code": None, "reason": "stage_in_failed"},
                   format="json")  # fmt: skip

        job.refresh_from_db()
        assert job.state == Job.State.FAILED and job.started_at is None
        assert "checksum: data.csv" in job.failure_reason
