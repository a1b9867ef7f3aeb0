"""The residency record: GET /api/v1/jobs/{id}/residency and its printable page."""

import pytest
from django.test import Client

from marketplace.accounts.secrets import secret_set
from marketplace.jobs.placement import job_place
from marketplace.kernel.models import AuditEvent
from tests.conftest import agent_client, job_make, problem_of, unit_online

pytestmark = pytest.mark.django_db
AGENT = "/api/agent/v1"


def run_job(owner, renter, start: dict | None, **fields):
    """A job restricted to Germany placed on a shed there whose agent asked for its secrets and,
    unless `start` is None, started it with that body and finished it."""
    unit, credential = unit_online(owner, name="shed", country="DE", gpus=1)
    agent = agent_client(credential)
    secret_set(owner=renter, name="hf-token", value="never-in-the-record")
    job = job_make(renter, jurisdictions=["DE"], secrets={"HF_TOKEN": "hf-token"}, **fields)
    allocation = job_place(job_id=job.pk)
    assert agent.get(f"{AGENT}/assignments/next").status_code == 200
    assert agent.post(f"{AGENT}/allocations/{allocation.pk}/secrets", {}, format="json").status_code == 200
    if start is not None:
        assert agent.post(f"{AGENT}/allocations/{allocation.pk}/start", start, format="json").status_code == 200
        finish = {"exit_code": 0}
        assert agent.post(f"{AGENT}/allocations/{allocation.pk}/finish", finish, format="json").status_code == 200
    return job, allocation, unit


@pytest.fixture
def ran(owner, renter):
    return run_job(owner, renter, {"image_digest": "sha256:" + "ab" * 32, "runs_in": "container"})


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


@pytest.mark.parametrize(
    ("start", "fields", "runtime", "network"),
    [
        ({"runs_in": "container"}, {}, "a container of the unit's engine (runc)", "none: the container had no network"),
        ({"runs_in": "container"}, {"network_egress": True}, "a container", "allowed out (network_egress)"),
        ({"runs_in": "sandbox"}, {}, "a gVisor sandbox (runsc)", "none: the container had no network"),
        # What ran, not what was asked: the development runtime cuts nothing, whatever the job wanted.
        ({"runs_in": "process"}, {"sandboxed": True}, "a plain process", "not cut"),
        ({}, {}, "not reported by the unit's agent", "none: the container had no network"),
        (None, {}, "never started", "never started"),
    ],
)
def test_the_record_states_what_the_agent_started_the_job_in(
    owner, renter, renter_api, start, fields, runtime, network
):
    job, _, _ = run_job(owner, renter, start, **fields)

    record = renter_api.get(f"/api/v1/jobs/{job.pk}/residency").json()

    assert record["isolation"]["runtime"].startswith(runtime)
    assert record["isolation"]["network"].startswith(network)
    assert [p["runs_in"] for p in record["placements"]] == [(start or {}).get("runs_in", "")]
    short = fields.get("sandboxed") and (start or {}).get("runs_in") not in (None, "sandbox")
    assert bool(record["isolation"]["short_of_request"]) == bool(short)


def test_an_agent_saying_it_runs_jobs_in_something_unknown_is_refused(owner, renter):
    unit, credential = unit_online(owner, name="shed", country="DE", gpus=1)
    agent = agent_client(credential)
    allocation = job_place(job_id=job_make(renter).pk)
    agent.get(f"{AGENT}/assignments/next")

    answer = agent.post(f"{AGENT}/allocations/{allocation.pk}/start", {"runs_in": "vm"}, format="json")

    assert "runs_in" in problem_of(answer, 400)["errors"]


def test_another_renter_gets_a_404(stranger_api, ran):
    job, _, _ = ran
    problem_of(stranger_api.get(f"/api/v1/jobs/{job.pk}/residency"), 404)


def test_the_job_list_shows_how_to_reach_a_jobs_services(renter, settings):
    from django.utils import timezone

    from marketplace.jobs.models import ServiceTraffic

    job = job_make(renter, ports=[{"port": 8000}, {"port": 22, "protocol": "tcp"}])
    ServiceTraffic.objects.create(job=job, day=timezone.now().date(), port=8000, requests=3)
    mine = Client()
    mine.force_login(renter)
    page = mine.get("/portal/jobs/").content.decode()
    assert f"/services/{job.pk}/8000/</code> (3 requests today)" in page
    assert f"<code>shedshare forward {job.pk} 22</code> (0 requests today)" in page
