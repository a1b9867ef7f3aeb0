"""Log shipping: an agent posts chunks of its job's output, kept once per offset and capped."""

import pytest

from marketplace.jobs import services
from marketplace.jobs.models import LogChunk
from marketplace.jobs.placement import job_place
from marketplace.jobs.selectors import allocation_log_text
from tests.conftest import agent_client, job_make, problem_of, unit_online

AGENT = "/api/agent/v1"


def logs_url(allocation) -> str:
    return f"{AGENT}/allocations/{allocation.pk}/logs"


@pytest.fixture
def shed(owner):
    unit, credential = unit_online(owner, name="shed", gpus=1)
    return unit, agent_client(credential)


@pytest.fixture
def allocation(shed, renter):
    allocation = job_place(job_id=job_make(renter).pk)
    assert allocation is not None
    return allocation


def ship(agent, allocation, offset: int, data: str):
    return agent.post(logs_url(allocation), {"offset": offset, "data": data}, format="json")


def test_chunks_are_kept_in_offset_order(shed, allocation):
    _, agent = shed

    second = ship(agent, allocation, 6, "world\n")
    first = ship(agent, allocation, 0, "hello ")

    assert first.status_code == second.status_code == 200, first.content
    assert first.json() == {"accepted": True, "truncated": False}
    assert allocation_log_text(allocation) == "hello world\n"


def test_a_chunk_sent_again_is_stored_once(shed, allocation):
    _, agent = shed
    ship(agent, allocation, 0, "épreuve\n")

    again = ship(agent, allocation, 0, "épreuve\n")

    assert again.status_code == 200
    assert again.json() == {"accepted": False, "truncated": False}
    assert LogChunk.objects.filter(allocation=allocation).count() == 1
    assert allocation_log_text(allocation) == "épreuve\n"


def test_whitespace_is_kept_as_the_job_wrote_it(shed, allocation):
    _, agent = shed

    ship(agent, allocation, 0, "  indented\n\n")

    assert allocation_log_text(allocation) == "  indented\n\n"


def test_past_the_cap_nothing_more_is_kept_and_the_agent_is_told(shed, allocation, monkeypatch):
    monkeypatch.setattr(services, "LOG_MAX_CHARS", 10)
    _, agent = shed

    fits = ship(agent, allocation, 0, "123456")
    cut = ship(agent, allocation, 6, "789abc")
    beyond = ship(agent, allocation, 12, "def")

    assert fits.json() == {"accepted": True, "truncated": False}
    assert cut.json() == {"accepted": True, "truncated": True}
    assert beyond.status_code == 200
    assert beyond.json() == {"accepted": False, "truncated": True}
    assert allocation_log_text(allocation) == "123456789a"


def test_another_units_allocation_is_a_404(allocation, owner):
    _, credential = unit_online(owner, name="intruder", gpus=1)

    problem_of(ship(agent_client(credential), allocation, 0, "sneaky"), 404)

    assert not LogChunk.objects.exists()


@pytest.mark.parametrize(
    "body",
    [
        {"offset": -1, "data": "x"},
        {"offset": 0, "data": "x" * (64 * 1024 + 1)},
        {"offset": 0, "data": "nul\x00"},
        {"offset": 0},
        {"offset": 0, "data": "x", "extra": 1},
    ],
    ids=["negative offset", "over 64 KiB", "NUL", "no data", "unknown field"],
)
def test_a_malformed_chunk_is_a_400(shed, allocation, body):
    _, agent = shed

    problem_of(agent.post(logs_url(allocation), body, format="json"), 400)

    assert not LogChunk.objects.exists()


def test_a_call_without_a_credential_is_refused(allocation, client):
    response = client.post(logs_url(allocation), {"offset": 0, "data": "x"}, content_type="application/json")

    assert response.status_code in (401, 403)
