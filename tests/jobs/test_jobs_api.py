"""The renter API: submit, read, list and cancel jobs at /api/v1/jobs, and the wallet balance."""

import pytest
from rest_framework.test import APIClient

from billing.services import wallet_credit_promotional
from marketplace.jobs.models import Job
from marketplace.jobs.placement import job_place
from marketplace.kernel.models import AuditEvent
from tests.conftest import JOB_SPEC, job_make, problem_of, renter_client, unit_online

JOBS = "/api/v1/jobs"


def job_url(job) -> str:
    return f"{JOBS}/{job.pk}"


def cancel_url(job) -> str:
    return f"{JOBS}/{job.pk}/cancel"


class TestSubmit:
    def test_a_valid_job_is_queued_with_normalised_fields(self, renter_api, renter):
        spec = {
            **JOB_SPEC,
            "name": "fine-tune",
            "gpu_count": 2,
            "gpu_models": ["h100 ", "H100", "a100"],
            "min_vram_gb": 40,
            "max_price_per_gpu_hour": "2.5",
            "isolation": "gpu",
            "jurisdictions": ["de", "FR", "de"],
            "max_duration_s": 600,
            "restartable": True,
        }

        response = renter_api.post(JOBS, spec, format="json")

        assert response.status_code == 201, response.content
        body = response.json()
        assert body["state"] == "queued"
        assert body["gpu_models"] == ["A100", "H100"]
        assert body["jurisdictions"] == ["DE", "FR"]
        assert body["max_price_per_gpu_hour"] == "2.500000"
        assert body["placement"] is None
        assert body["usage"] == {"gpu_seconds": 0, "cost": "0.000000"}
        job = Job.objects.get(pk=body["id"])
        assert job.renter == renter
        assert job.max_price_per_gpu_hour_micros == 2_500_000
        assert (job.gpu_count, job.min_vram_gb, job.max_duration_s, job.restartable) == (2, 40, 600, True)
        assert job.command == ["python", "train.py"]

    def test_defaults_fill_what_the_renter_left_out(self, renter_api):
        body = renter_api.post(JOBS, JOB_SPEC, format="json").json()

        assert body["gpu_count"] == 1
        assert body["isolation"] == "gpu"
        assert body["gpu_models"] == []
        assert body["jurisdictions"] == []
        assert body["max_price_per_gpu_hour"] is None
        assert body["restartable"] is False

    def test_a_service_declares_its_ports_and_runs_until_stopped_within_the_cap(self, renter_api, settings):
        ports = [{"port": 8000, "protocol": "http"}, {"port": 22, "protocol": "tcp"}]
        service = renter_api.post(JOBS, {**JOB_SPEC, "workload_class": "service", "ports": ports}, format="json")
        assert service.status_code == 201, service.content
        assert service.json()["ports"] == ports
        assert service.json()["max_duration_s"] == settings.JOB_MAX_DURATION_S
        batch = renter_api.post(JOBS, {**JOB_SPEC, "ports": [{"port": 8888}]}, format="json").json()
        assert batch["max_duration_s"] == settings.JOB_DEFAULT_MAX_DURATION_S
        assert batch["ports"] == [{"port": 8888, "protocol": "http"}]

    @pytest.mark.parametrize(
        "ports",
        [
            pytest.param([{"port": 0}], id="port-0"),
            pytest.param([{"port": 65536}], id="port-too-high"),
            pytest.param([{"port": 80, "protocol": "udp"}], id="unknown-protocol"),
            pytest.param([{"port": 80}, {"port": 80, "protocol": "tcp"}], id="twice"),
            pytest.param([{"port": 1000 + n} for n in range(9)], id="too-many"),
            pytest.param([{"port": 80, "host": "any"}], id="unknown-field"),
            pytest.param({"port": 80}, id="not-a-list"),
        ],
    )
    def test_bad_ports_are_refused(self, renter_api, ports):
        body = problem_of(renter_api.post(JOBS, {**JOB_SPEC, "ports": ports}, format="json"), 400)
        assert "ports" in body["errors"], body
        assert not Job.objects.exists()

    def test_placement_requirements_are_stored_normalised(self, renter_api):
        spec = {
            **JOB_SPEC,
            "jurisdictions": ["eu+eea+ch", "uk", "de-by"],
            "require_verified_location": True,
            "gpu_milli": 250,
            "isolation": "shared",
            "min_cuda": "12.02",
            "workload_class": "inference",
            "rank": "reliable",
        }

        body = renter_api.post(JOBS, spec, format="json").json()

        assert body["jurisdictions"] == ["CH", "DE-BY", "EEA", "EU", "GB"]
        assert (body["require_verified_location"], body["gpu_milli"], body["min_cuda"]) == (True, 250, "12.2")
        assert (body["workload_class"], body["rank"]) == ("inference", "reliable")
        job = Job.objects.get(pk=body["id"])
        assert (job.gpu_milli, job.min_cuda, job.workload_class, job.rank) == (250, "12.2", "inference", "reliable")

    def test_verified_location_without_jurisdictions_means_anywhere_but_verified(self, renter_api):
        body = renter_api.post(JOBS, {**JOB_SPEC, "require_verified_location": True}, format="json").json()

        assert (body["jurisdictions"], body["require_verified_location"]) == ([], True)

    def test_the_new_requirements_have_defaults(self, renter_api):
        body = renter_api.post(JOBS, JOB_SPEC, format="json").json()

        assert body["require_verified_location"] is False
        assert (body["gpu_milli"], body["min_cuda"], body["workload_class"], body["rank"]) == (
            None,
            "",
            "batch",
            "cheapest",
        )

    def test_an_unknown_jurisdiction_is_named_in_a_readable_error(self, renter_api):
        body = problem_of(
            renter_api.post(JOBS, {**JOB_SPEC, "jurisdictions": ["EU", "XX", "DE-ZZ"]}, format="json"), 400
        )

        assert "DE-ZZ, XX" in body["errors"]["jurisdictions"][0]

    def test_a_trailing_slash_is_accepted(self, renter_api):
        response = renter_api.post(f"{JOBS}/", JOB_SPEC, format="json")

        assert response.status_code == 201, response.content

    def test_submitting_asks_for_placement_and_is_audited(self, renter_api, django_capture_on_commit_callbacks):
        with django_capture_on_commit_callbacks() as enqueued:
            body = renter_api.post(JOBS, JOB_SPEC, format="json").json()

        assert len(enqueued) == 1
        assert AuditEvent.objects.filter(action="job.submitted", subject_id=body["id"]).exists()

    @pytest.mark.parametrize(
        "changes, field",
        [
            pytest.param({"image": None}, "image", id="missing-image"),
            pytest.param({"image": "Not An Image!"}, "image", id="bad-image-ref"),
            pytest.param({"image": "ghcr.io/acme/train:"}, "image", id="empty-tag"),
            pytest.param({"command": []}, "command", id="empty-command"),
            pytest.param({"command": "python train.py"}, "command", id="command-not-a-list"),
            pytest.param({"command": None}, "command", id="missing-command"),
            pytest.param({"gpu_count": 0}, "gpu_count", id="gpu-count-0"),
            pytest.param({"gpu_count": 99}, "gpu_count", id="gpu-count-99"),
            pytest.param({"gpu_count": "two"}, "gpu_count", id="gpu-count-not-a-number"),
            pytest.param({"max_price_per_gpu_hour": "-1"}, "max_price_per_gpu_hour", id="negative-price"),
            pytest.param({"max_price_per_gpu_hour": "cheap"}, "max_price_per_gpu_hour", id="price-not-a-number"),
            pytest.param({"jurisdictions": ["XX"]}, "jurisdictions", id="unknown-country"),
            pytest.param({"jurisdictions": "DE"}, "jurisdictions", id="countries-not-a-list"),
            pytest.param({"jurisdictions": ["DE-ZZ"]}, "jurisdictions", id="unknown-subdivision"),
            pytest.param({"jurisdictions": ["EU", "EUR"]}, "jurisdictions", id="unknown-named-set"),
            pytest.param({"jurisdictions": ["EU+"]}, "jurisdictions", id="empty-part"),
            pytest.param({"jurisdictions": [["DE"]]}, "jurisdictions", id="nested-list"),
            pytest.param({"require_verified_location": "maybe"}, "require_verified_location", id="verified-not-bool"),
            pytest.param({"gpu_milli": 0}, "gpu_milli", id="fraction-0"),
            pytest.param({"gpu_milli": 1001}, "gpu_milli", id="fraction-over-one-gpu"),
            pytest.param({"gpu_milli": 500}, "gpu_milli", id="fraction-of-an-exclusive-gpu"),
            pytest.param(
                {"gpu_milli": 500, "gpu_count": 2, "isolation": "shared"}, "gpu_milli", id="fraction-of-two-gpus"
            ),
            pytest.param({"min_cuda": "twelve"}, "min_cuda", id="cuda-not-a-version"),
            pytest.param({"min_cuda": "12.2.1"}, "min_cuda", id="cuda-with-patch"),
            pytest.param({"workload_class": "mining"}, "workload_class", id="unknown-workload-class"),
            pytest.param({"rank": "fastest"}, "rank", id="unknown-rank"),
            pytest.param({"isolation": "vm"}, "isolation", id="unknown-isolation"),
            pytest.param({"min_vram_gb": -1}, "min_vram_gb", id="negative-vram"),
            pytest.param({"max_duration_s": 0}, "max_duration_s", id="zero-duration"),
            pytest.param({"gpus": 2}, "gpus", id="unknown-field"),
        ],
    )
    def test_a_malformed_spec_is_refused_naming_the_field(self, renter_api, changes, field):
        spec = {key: value for key, value in {**JOB_SPEC, **changes}.items() if value is not None}

        body = problem_of(renter_api.post(JOBS, spec, format="json"), 400)

        assert body["type"] == "/problems/validation-error"
        assert field in body["errors"], body
        assert all(isinstance(message, str) for message in body["errors"][field])
        assert not Job.objects.exists()

    def test_a_body_that_is_not_json_is_refused(self, renter_api):
        body = problem_of(renter_api.post(JOBS, "image=python", content_type="application/json"), 400)

        assert body["type"] == "/problems/parse-error"
        assert not Job.objects.exists()

    @pytest.mark.parametrize(
        "payload, field",
        [([JOB_SPEC], "non_field_errors"), ("python", "non_field_errors"), (42, "non_field_errors"), (None, "image")],
        ids=["array", "string", "number", "null"],
    )
    def test_a_json_body_that_is_not_an_object_is_refused(self, renter_api, payload, field):
        body = problem_of(renter_api.post(JOBS, payload, format="json"), 400)

        assert field in body["errors"]
        assert not Job.objects.exists()

    def test_anonymous_callers_are_refused(self, db):
        body = problem_of(APIClient().post(JOBS, JOB_SPEC, format="json"), 401)

        assert body["type"] == "/problems/not-authenticated"
        assert not Job.objects.exists()

    def test_an_unknown_api_key_is_refused(self, db):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION="Bearer shs_live_abcdef123456_nope")

        problem_of(client.get(JOBS), 401)


class TestRead:
    def test_a_renter_reads_their_own_job(self, renter_api, renter):
        job = job_make(renter, name="mine")

        response = renter_api.get(job_url(job))

        assert response.status_code == 200
        assert response.json()["id"] == str(job.pk)
        assert response.json()["name"] == "mine"

    def test_a_placed_job_shows_where_it_runs(self, renter_api, renter, owner):
        unit, _ = unit_online(owner, name="shed", gpus=2)
        job = job_make(renter)
        job_place(job_id=job.pk)

        placement = renter_api.get(job_url(job)).json()["placement"]

        assert placement == {
            "unit_id": str(unit.pk),
            "country": "DE",
            "subdivision": "",
            "price_per_gpu_hour": "2.000000",
            "gpu_count": 1,
            "image_digest": "",  # until its agent starts it
        }

    def test_another_renters_job_is_a_404(self, renter, stranger_api):
        job = job_make(renter)

        problem_of(stranger_api.get(job_url(job)), 404)

    def test_another_renter_cannot_cancel_the_job(self, renter, stranger_api):
        job = job_make(renter)

        problem_of(stranger_api.post(cancel_url(job)), 404)

        assert Job.objects.get(pk=job.pk).state == Job.State.QUEUED

    def test_the_list_shows_only_the_renters_own_jobs(self, renter, stranger, renter_api):
        mine = {str(job_make(renter).pk) for _ in range(3)}
        job_make(stranger)

        body = renter_api.get(JOBS).json()

        assert body["count"] == 3
        assert {job["id"] for job in body["results"]} == mine

    def test_the_list_is_newest_first(self, renter, renter_api):
        first, second = job_make(renter, name="first"), job_make(renter, name="second")

        ids = [job["id"] for job in renter_api.get(JOBS).json()["results"]]

        assert ids == [str(second.pk), str(first.pk)]

    def test_staff_see_only_their_own_jobs_through_the_api(self, renter, stranger, staff):
        """The admin is the staff's tool for other people's jobs; the API serves each caller's own."""
        jobs = {job_make(renter).pk, job_make(stranger).pk}
        own = job_make(staff).pk

        assert set(Job.objects.visible_to(staff).values_list("pk", flat=True)) == jobs | {own}
        body = renter_client(staff).get(JOBS).json()
        assert {job["id"] for job in body["results"]} == {str(own)}

    def test_the_queryset_scoping_hides_others_jobs(self, renter, stranger):
        job_make(renter)

        assert not Job.objects.visible_to(stranger).exists()

    def test_an_unknown_job_is_a_404(self, renter_api):
        problem_of(renter_api.get(f"{JOBS}/00000000-0000-0000-0000-000000000000"), 404)


class TestCancel:
    def test_cancelling_a_queued_job(self, renter, renter_api):
        job = job_make(renter)

        response = renter_api.post(cancel_url(job))

        assert response.status_code == 200, response.content
        assert response.json()["state"] == "cancelled"
        job.refresh_from_db()
        assert job.state == Job.State.CANCELLED
        assert job.finished_at is not None

    def test_cancelling_twice_is_a_conflict(self, renter, renter_api):
        job = job_make(renter)
        renter_api.post(cancel_url(job))

        body = problem_of(renter_api.post(cancel_url(job)), 409)

        assert body["type"] == "/problems/state-conflict"

    def test_cancelling_a_placed_job_frees_its_gpus(self, renter, renter_api, owner):
        unit_online(owner, name="shed", gpus=1)
        job = job_make(renter)
        allocation = job_place(job_id=job.pk)

        renter_api.post(cancel_url(job))

        allocation.refresh_from_db()
        assert allocation.released_at is not None
        assert not allocation.leases.filter(released_at__isnull=True).exists()
        assert job_place(job_id=job_make(renter).pk) is not None

    def test_a_get_on_cancel_is_not_allowed(self, renter, renter_api):
        job = job_make(renter)

        problem_of(renter_api.get(cancel_url(job)), 405)

        assert Job.objects.get(pk=job.pk).state == Job.State.QUEUED


class TestUnknownUrls:
    @pytest.mark.parametrize("path", ["/api/v1/nothing-here", "/api/v1/jobs/not-a-uuid", "/api/v2/jobs"])
    def test_an_unknown_api_url_is_a_problem_not_a_page(self, renter_api, path):
        body = problem_of(renter_api.get(path), 404)

        assert body["type"] == "/problems/not-found"


class TestBalance:
    def test_a_new_renter_has_an_empty_wallet(self, renter_api):
        response = renter_api.get("/api/v1/balance")

        assert response.status_code == 200
        assert response.json() == {"currency": "usd", "balance": "0.000000"}

    def test_credit_shows_in_the_balance(self, renter, renter_api, stranger):
        wallet_credit_promotional(user=renter, amount_micros=12_500_000, key="welcome")
        wallet_credit_promotional(user=stranger, amount_micros=99_000_000, key="other")

        assert renter_api.get("/api/v1/balance").json() == {"currency": "usd", "balance": "12.500000"}

    def test_anonymous_callers_have_no_balance(self, db):
        problem_of(APIClient().get("/api/v1/balance"), 401)
