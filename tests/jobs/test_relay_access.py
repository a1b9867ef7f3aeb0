"""Who the relay lets through to a job's port (marketplace/jobs/relay/access.py), the endpoint
tokens a renter gives their own users, and what the job's record says of its services."""

import pytest

from marketplace.accounts.services import api_key_create
from marketplace.jobs.models import Allocation, Job, ServiceTraffic
from marketplace.jobs.relay import access
from marketplace.jobs.relay.channels import Unavailable
from tests.conftest import job_make, renter_client, unit_online

HTTP, TCP = 8000, 2222


@pytest.fixture
def served(renter, owner):
    """A running job of the renter's with an HTTP and a TCP port, on an online unit."""
    unit, _ = unit_online(owner)
    job = job_make(renter, workload_class="service",
                   ports=[{"port": HTTP, "protocol": "http"}, {"port": TCP, "protocol": "tcp"}])  # fmt: skip
    Job.objects.filter(pk=job.pk).update(state=Job.State.RUNNING)
    Allocation.objects.create(job=job, unit=unit, price_per_gpu_hour_micros=1, gpu_count=1)
    return Job.objects.get(pk=job.pk)


def refused(token: str, job, port: int, protocol: str | None) -> int:
    with pytest.raises(Unavailable) as answer:
        access.target(token, str(job.pk), port, protocol=protocol)
    return answer.value.status


def test_the_renters_key_reaches_every_declared_port_and_nothing_else(served, renter, stranger):
    _, key = api_key_create(user=renter, name="mine")
    assert access.target(key, str(served.pk), HTTP, protocol="http").allocation_id
    assert access.target(key, str(served.pk), TCP, protocol=None).port == TCP
    assert refused(key, served, TCP, "http") == 404  # a TCP port has no URL
    assert refused(key, served, 9999, None) == 404
    assert refused(api_key_create(user=stranger, name="theirs")[1], served, HTTP, "http") == 404
    assert refused(api_key_create(user=renter, name="narrow", scopes=["submit"])[1], served, HTTP, "http") == 403
    read_only = api_key_create(user=renter, name="reader", scopes=["read"])[1]
    assert access.target(read_only, str(served.pk), HTTP, protocol="http", scope="read").port == HTTP
    with pytest.raises(Unavailable) as writes:  # a POST to the service, or a tunnel, is more than reading
        access.target(read_only, str(served.pk), TCP, protocol=None, scope="submit")
    assert writes.value.status == 403
    assert refused("", served, HTTP, "http") == 401
    Job.objects.filter(pk=served.pk).update(state=Job.State.CANCELLED)
    assert refused(key, served, HTTP, "http") == 410


def test_a_job_not_running_yet_is_a_503_to_come_back_to(renter):
    job = job_make(renter, ports=[{"port": HTTP}])
    _, key = api_key_create(user=renter, name="mine")
    with pytest.raises(Unavailable) as answer:
        access.target(key, str(job.pk), HTTP, protocol="http")
    assert answer.value.status == 503 and answer.value.retry_after


def test_an_endpoint_token_opens_its_jobs_http_ports_until_revoked(served, renter):
    api = renter_client(renter)
    made = api.post(f"/api/v1/jobs/{served.pk}/endpoint-tokens", {"name": "my app"}, format="json")
    assert made.status_code == 201, made.content
    token = made.json()["token"]
    assert access.target(token, str(served.pk), HTTP, protocol="http").job_id == str(served.pk)
    assert refused(token, served, TCP, None) == 401  # forwarding is the renter's alone
    other = job_make(renter, ports=[{"port": HTTP}])
    assert refused(token, other, HTTP, "http") == 404

    listed = api.get(f"/api/v1/jobs/{served.pk}/endpoint-tokens").json()
    assert [entry["name"] for entry in listed] == ["my app"] and "token" not in listed[0]
    revoke = api.delete(f"/api/v1/jobs/{served.pk}/endpoint-tokens/{made.json()['id']}")
    assert revoke.status_code == 204
    assert refused(token, served, HTTP, "http") == 401


def test_another_renter_cannot_make_or_revoke_a_jobs_tokens(served, renter, stranger_api):
    assert (
        stranger_api.post(f"/api/v1/jobs/{served.pk}/endpoint-tokens", {"name": "x"}, format="json").status_code == 404
    )
    token = renter_client(renter).post(f"/api/v1/jobs/{served.pk}/endpoint-tokens", {"name": "a"}, format="json")
    assert stranger_api.delete(f"/api/v1/jobs/{served.pk}/endpoint-tokens/{token.json()['id']}").status_code == 404
    malformed = "1de42da3fb6bfa9ac76c-aa47e5d107f4381"  # 36 characters of the id's alphabet, no UUID
    assert renter_client(renter).delete(f"/api/v1/jobs/{served.pk}/endpoint-tokens/{malformed}").status_code == 404


def test_the_job_shows_its_services_and_the_traffic_counts_add_up(served, renter):
    from django.utils import timezone

    today = timezone.now().date()
    access.traffic_add({(str(served.pk), today, HTTP, "DE"): [3, 100, 5000]})
    access.traffic_add({(str(served.pk), today, HTTP, "DE"): [2, 10, 500]})
    row = ServiceTraffic.objects.get(job=served, port=HTTP)
    assert (row.requests, row.bytes_in, row.bytes_out) == (5, 110, 5500)

    body = renter_client(renter).get(f"/api/v1/jobs/{served.pk}").json()
    http, tcp = body["services"]
    assert http["url"].endswith(f"/services/{served.pk}/{HTTP}/") and http["requests_today"] == 5
    assert tcp["url"] is None and tcp["forward"] == f"shedshare forward {served.pk} {TCP}"
    record = renter_client(renter).get(f"/api/v1/jobs/{served.pk}/residency").json()
    assert record["services"]["traffic"] == [
        {"day": today.isoformat(), "port": HTTP, "relayed_in": "DE", "requests": 5, "bytes_in": 110, "bytes_out": 5500}
    ]


def test_a_job_kept_in_its_jurisdictions_is_served_only_by_servers_within_them(served, renter, settings):
    Job.objects.filter(pk=served.pk).update(jurisdictions=["EU"], relay_in_jurisdiction=True)
    _, key = api_key_create(user=renter, name="mine")
    target = access.target(key, str(served.pk), HTTP, protocol="http")
    assert access.relay_refusal(target, here="DE-HE", through_holder=False) is None
    assert "runs in US" in access.relay_refusal(target, here="US", through_holder=False)
    assert "unstated" in access.relay_refusal(target, here="", through_holder=False)
    # Through another server, both must be within: that one holds the stream the bytes cross.
    assert "holding the shed's connection" in access.relay_refusal(target, here="FR", through_holder=True)
    Job.objects.filter(pk=served.pk).update(relay_in_jurisdiction=False)
    free = access.target(key, str(served.pk), HTTP, protocol="http")
    assert access.relay_refusal(free, here="US", through_holder=True) is None


def test_relay_in_jurisdiction_needs_jurisdictions(renter_api):
    from tests.conftest import JOB_SPEC, problem_of

    body = problem_of(renter_api.post("/api/v1/jobs", {**JOB_SPEC, "relay_in_jurisdiction": True}, format="json"), 400)
    assert "relay_in_jurisdiction" in body["errors"]
    kept = renter_api.post("/api/v1/jobs", {**JOB_SPEC, "relay_in_jurisdiction": True, "jurisdictions": ["DE"]},
                           format="json")  # fmt: skip
    assert kept.status_code == 201 and kept.json()["relay_in_jurisdiction"] is True
