"""The residency record: GET /api/v1/jobs/{id}/residency and its printable page."""

import pytest
from django.test import Client

from marketplace.accounts.secrets import secret_set
from marketplace.jobs.placement import job_place
from marketplace.kernel.models import AuditEvent
from tests.conftest import agent_client, job_make, problem_of, unit_online

pytestmark = pytest.mark.django_db
AGENT = "/api/agent/v1"


@pytest.fixture
def ran(owner, renter):
    """A job restricted to Germany that ran on a shed there, with a secret handed to its agent."""
    unit, credential = unit_online(owner, name="shed", country="DE", gpus=1)
    agent = agent_client(credential)
    secret_set(owner=renter, name="hf-token", value="never-in-the-record")
    job = job_make(renter, jurisdictions=["DE"], secrets={"HF_TOKEN": "hf-token"})
    allocation = job_place(job_id=job.pk)
    assert agent.get(f"{AGENT}/assignments/next").status_code == 200
    assert agent.post(f"{AGENT}/allocations/{allocation.pk}/secrets", {}, format="json").status_code == 200
    digest = "sha256:" + "ab" * 32
    assert (
        agent.post(f"{AGENT}/allocations/{allocation.pk}/start", {"image_digest": digest}, format="json").status_code
        == 200
    )
    assert agent.post(f"{AGENT}/allocations/{allocation.pk}/finish", {"exit_code": 0}, format="json").status_code == 200
    return job, allocation, unit


def test_the_record_says_where_it_ran_under_which_rules_and_the_events_behind_it(renter_api, ran):
    job, allocation, unit = ran

    record = renter_api.get(f"/api/v1/jobs/{job.pk}/residency").json()

    assert record["rules"] == {"jurisdictions": ["DE"], "require_verified_location": False}
    assert record["isolation"]["network"].startswith("none")
    [placement] = record["placements"]
    assert (placement["unit"], placement["country"], placement["allocation"]) == (
        str(unit.pk),
        "DE",
        str(allocation.pk),
    )
    assert placement["location"]["jurisdiction_matched"] == "DE"
    assert placement["image_digest"] == "sha256:" + "ab" * 32
    assert placement["started_at"] and placement["released_at"]
    actions = set(AuditEvent.objects.filter(pk__in=placement["events"]).values_list("action", flat=True))
    assert {"job.placed", "job.started"} <= actions
    assert record["secrets"]["variables"] == ["HF_TOKEN"]
    assert [d["actor"] for d in record["secrets"]["delivered_to"]] == [f"unit:{unit.pk}"]
    assert {e["action"] for e in record["events"]} >= {"job.submitted", "job.placed", "job.started", "job.succeeded"}
    assert "never-in-the-record" not in str(record)


def test_the_page_prints_the_same_record_for_its_renter_only(renter, stranger, ran):
    job, _, unit = ran
    mine, theirs = Client(), Client()
    mine.force_login(renter)
    theirs.force_login(stranger)

    page = mine.get(f"/portal/jobs/{job.pk}/residency/")

    assert page.status_code == 200
    text = page.content.decode()
    assert "Residency record" in text and str(unit.pk) in text and "DE" in text and "job.started" in text
    assert "never-in-the-record" not in text
    assert theirs.get(f"/portal/jobs/{job.pk}/residency/").status_code == 404
    assert f"/portal/jobs/{job.pk}/residency/" in mine.get("/portal/jobs/").content.decode()


def test_another_renter_gets_a_404(stranger_api, ran):
    job, _, _ = ran
    problem_of(stranger_api.get(f"/api/v1/jobs/{job.pk}/residency"), 404)
