"""Agents report the country they are configured for: a unit whose agent disagrees with its
declared country gets no residency-restricted job, and its owner sees why."""

from dataclasses import asdict

import pytest

from marketplace.jobs.placement import job_place
from marketplace.kernel.models import AuditEvent
from nodes.models import Unit
from tests.conftest import agent_client, gpus_make, job_make, problem_of, unit_online

HEARTBEAT = "/api/agent/v1/heartbeat"


@pytest.fixture
def shed(owner):
    unit, credential = unit_online(owner, name="shed", country="DE", gpus=2)
    return unit, agent_client(credential)


def beat(agent, **extra):
    body = {"gpus": [asdict(gpu) for gpu in gpus_make(2, prefix="GPU-shed")], "agent_version": "t", **extra}
    response = agent.post(HEARTBEAT, body, format="json")
    assert response.status_code == 200, response.content
    return response


def test_the_heartbeat_stores_the_agents_country_and_audits_a_change(shed):
    unit, agent = shed
    version = Unit.objects.get(pk=unit.pk).capacity_version

    beat(agent, country="FR")
    beat(agent, country="FR")

    unit.refresh_from_db()
    assert unit.agent_country == "FR"
    assert unit.capacity_version > version  # placement reads it again
    event = AuditEvent.objects.get(action="unit.agent_country_reported", subject_id=unit.pk)
    assert event.data == {"country": "FR", "previous": "", "declared": "DE"}


def test_an_agent_that_stops_naming_a_country_names_none(shed):
    unit, agent = shed
    beat(agent, country="DE")

    beat(agent)

    assert Unit.objects.get(pk=unit.pk).agent_country == ""


@pytest.mark.parametrize("country", ["de", "DEU", "D", 5, "D\x00"])
def test_a_country_that_is_not_an_iso_code_is_a_400(shed, country):
    _, agent = shed
    body = {"gpus": [asdict(gpu) for gpu in gpus_make(2, prefix="GPU-shed")], "country": country}

    problem_of(agent.post(HEARTBEAT, body, format="json"), 400)


def test_a_unit_whose_agent_disagrees_gets_no_residency_restricted_job_but_others(shed, renter):
    unit, agent = shed
    beat(agent, country="FR")

    restricted = job_make(renter, jurisdictions=["DE"])
    assert job_place(job_id=restricted.pk) is None
    restricted.refresh_from_db()
    assert restricted.pending_reason["rejected"] == {"agent_country": 1}
    assert job_place(job_id=job_make(renter).pk).unit_id == unit.pk

    beat(agent, country="DE")  # the owner corrected the agent's configuration

    assert job_place(job_id=restricted.pk).unit_id == unit.pk


def test_the_owner_sees_why_on_the_unit_page(shed, client, owner):
    unit, agent = shed
    client.force_login(owner)
    assert 'id="placement-holds"' not in client.get(f"/portal/units/{unit.pk}/").content.decode()

    beat(agent, country="FR")
    page = client.get(f"/portal/units/{unit.pk}/").content.decode()

    assert 'id="placement-holds"' in page
    assert "The agent is configured for France (FR), but the unit is declared in Germany (DE)" in page
