"""GET /api/v1/jobs/{id}/placements: a renter's export of why each placement of a job was allowed."""

import csv
import io
import json
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.admin.sites import site
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from marketplace.jobs.placement import job_place
from marketplace.jobs.services import allocations_expire_unacknowledged
from marketplace.kernel.models import AuditEvent
from tests.conftest import job_make, problem_of, renter_client, unit_online


def placements_url(job) -> str:
    return f"/api/v1/jobs/{job.pk}/placements"


@pytest.fixture
def placed_twice(owner, renter):
    """A job placed in Bavaria, left unacknowledged, queued again and placed a second time."""
    # Two GPUs, so the second placement does not wait for placement to notice the first release.
    unit, _ = unit_online(owner, name="shed", gpus=2, subdivision="DE-BY")
    job = job_make(renter, jurisdictions=["EU"])
    first = job_place(job_id=job.pk)
    allocations_expire_unacknowledged(now=timezone.now() + timedelta(hours=1))
    second = job_place(job_id=job.pk)
    assert first and second and first.pk != second.pk
    return job, unit, [first, second]


class TestExport:
    def test_the_renter_reads_every_placement_oldest_first_with_its_policy(self, placed_twice, renter_api):
        job, unit, allocations = placed_twice

        response = renter_api.get(placements_url(job))

        assert response.status_code == 200, response.content
        records = response.json()
        assert [r["allocation_id"] for r in records] == [str(a.pk) for a in allocations]
        first = records[0]
        assert (first["unit_id"], first["country"], first["subdivision"]) == (str(unit.pk), "DE", "DE-BY")
        assert first["price_per_gpu_hour"] == "2.000000"
        assert first["placed_at"]
        assert first["policy"]["jurisdiction"] == {"required": ["EU"], "unit": "DE-BY", "matched": "EU"}

    def test_the_record_is_the_allocations_own_field_not_the_audit_trail(self, placed_twice, renter_api):
        job, unit, allocations = placed_twice
        first = allocations[0]
        first.refresh_from_db()
        # The unit moves afterwards: the record keeps where it was when it was chosen.
        unit.country, unit.subdivision = "FR", ""
        unit.save(update_fields=["country", "subdivision"])

        records = renter_api.get(placements_url(job)).json()

        assert first.placement_record["country"] == "DE"
        assert records[0]["policy"] == first.placement_record["policy"]
        assert records[0]["country"] == "DE"
        audited = AuditEvent.objects.get(action="job.placed", data__allocation=str(first.pk))
        assert audited.data["policy"] == first.placement_record["policy"]  # people read the same facts

    def test_a_job_never_placed_has_no_records(self, renter, renter_api):
        assert renter_api.get(placements_url(job_make(renter))).json() == []

    def test_another_renters_job_is_a_404(self, placed_twice, stranger_api):
        job, _, _ = placed_twice

        problem_of(stranger_api.get(placements_url(job)), 404)

    def test_a_stranger_asking_for_csv_gets_a_problem_document_not_a_csv(self, placed_twice, stranger_api):
        job, _, _ = placed_twice

        problem_of(stranger_api.get(placements_url(job), {"format": "csv"}), 404)

    def test_staff_read_other_renters_placements_in_the_admin_not_the_api(self, placed_twice, staff):
        job, _, _ = placed_twice

        problem_of(renter_client(staff).get(placements_url(job)), 404)

    def test_anonymous_callers_are_refused(self, placed_twice, client):
        job, _, _ = placed_twice

        problem_of(client.get(placements_url(job)), 401)

    @pytest.mark.parametrize("how", [{"data": {"format": "csv"}}, {"HTTP_ACCEPT": "text/csv"}], ids=["query", "accept"])
    def test_csv_has_one_row_per_placement_with_dotted_policy_columns(self, placed_twice, renter_api, how):
        job, _, allocations = placed_twice

        response = renter_api.get(placements_url(job), **how)

        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/csv")
        assert "attachment" in response["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(response.content.decode())))
        assert [row["allocation_id"] for row in rows] == [str(a.pk) for a in allocations]
        assert rows[0]["policy.jurisdiction.matched"] == "EU"
        assert json.loads(rows[0]["policy.jurisdiction.required"]) == ["EU"]

    def test_the_endpoint_is_in_the_api_schema(self, renter_api):
        schema = renter_api.get("/api/schema/", HTTP_ACCEPT="application/json").content.decode()

        assert "/api/v1/jobs/{id}/placements" in schema


class TestAdminExport:
    def test_selected_audit_events_export_as_json(self, placed_twice, staff, rf):
        job, _, _ = placed_twice
        request = rf.post("/")
        request.user = staff
        events = AuditEvent.objects.filter(subject_id=job.pk)

        response = site._registry[AuditEvent].export_json(request, events)

        exported = json.loads(response.content)
        assert [e["action"] for e in exported] == list(
            events.order_by("created_at", "id").values_list("action", flat=True)
        )
        assert {e["subject_id"] for e in exported} == {str(job.pk)}
        assert "policy" in next(e for e in exported if e["action"] == "job.placed")["data"]
        assert "attachment" in response["Content-Disposition"]

    def test_the_subject_column_links_to_that_subjects_whole_trail(self, placed_twice):
        job, _, _ = placed_twice
        event = AuditEvent.objects.filter(subject_id=job.pk).first()

        link = site._registry[AuditEvent].subject(SimpleNamespace(subject_id=event.subject_id))

        assert f"?subject_id={job.pk}" in link

    def test_the_audit_list_filters_by_subject(self, placed_twice, owner, settings):
        settings.STORAGES = {
            **settings.STORAGES,
            "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        }
        job, unit, _ = placed_twice
        operator = get_user_model().objects.create_superuser(username="oscar-operator", password="pw-oscar")
        client = Client()
        client.force_login(operator)

        page = client.get("/admin/kernel/auditevent/", {"subject_id": str(job.pk)}).content.decode()

        assert f">{job.pk}</a>" in page
        assert str(unit.pk) not in page  # the unit's own events are filtered out
