"""Issue 6's authorisation matrix: every API operation x every kind of caller, with the exact status.

The targets of every request are renter A's objects (A's job, its allocation on the owner's unit,
A's top-up, a spare API key of A's). Each row gives the status each identity must get; on top of
that, for every response:

- no object that belongs to someone else appears in the body (``MARKERS``), and
- when the caller is not renter A (nor the unit's own agent, the positive control of the agent
  API), nothing of renter A's is changed (``a_world``, read again from the database).

The table is checked against the URL configuration and the OpenAPI schema, so an endpoint added
under /api/v1/ or /api/agent/v1/ without a row here fails ``test_every_route_has_a_row``.

Excluded, on purpose:

- ``POST /api/agent/v1/enrol``: unauthenticated by design, the one-time enrolment token in the body
  is the credential; tests/nodes/test_enrolment.py covers it.
- ``POST /api/stripe/webhook``: authenticated by Stripe's signature, not by a caller identity;
  tests/billing/test_webhooks.py covers it. (It is outside /api/v1/, listed here for completeness.)

Decisions recorded here:

- Staff are renters like any other in the API: their own objects only. The admin is the staff tool.
- A node credential on a renter endpoint is a 401, not a 403: the renter API does not recognise
  node credentials at all, so the caller is unauthenticated there. Likewise any API key (renter,
  owner or staff) on the agent API is a 401.
"""

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.urls import URLResolver, get_resolver, resolve
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from billing.models import TopUp
from billing.selectors import wallet_balance_micros
from billing.topups import topup_create
from marketplace.accounts.models import ApiKey, Secret
from marketplace.accounts.secrets import secret_set
from marketplace.accounts.services import api_key_create
from marketplace.jobs.job_templates import template_save
from marketplace.jobs.models import Allocation, EndpointToken, Job, JobTemplate, LogChunk, UsageSample
from marketplace.jobs.placement import job_place
from marketplace.jobs.relay.tokens import endpoint_token_create
from marketplace.jobs.services import log_chunk_record
from marketplace.jobs.usage import SampleReport, usage_record
from marketplace.kernel.models import AuditEvent
from tests.conftest import JOB_SPEC, agent_client, allocation_since, job_make, unit_online, user_make

PREFIXES = ("/api/v1/", "/api/agent/v1/")
EXCLUDED = {
    ("POST", "/api/agent/v1/enrol"): "unauthenticated enrolment: the enrolment token is the credential",
    ("POST", "/api/stripe/webhook"): "authenticated by Stripe's signature; see tests/billing/test_webhooks.py",
}

# Identities, the columns of the matrix.
ANON = "anonymous"
A = "renter A"
A_READ = "renter A, read-only key"
B = "renter B"
OWNER = "owner"
STAFF = "staff"
OTHER_AGENT = "another unit's agent"
OWN_AGENT = "the unit's own agent"
IDENTITIES = (ANON, A, A_READ, B, OWNER, STAFF, OTHER_AGENT, OWN_AGENT)
# Callers that may change renter A's objects: A, and the agent of the unit A's job runs on.
MAY_CHANGE_A = {A, OWN_AGENT}

SECRET_LOG = "renter-a-secret-output\n"
SECRET_VALUE = "renter-a-secret-value-for-its-job"


def renter_api(*, statuses: dict, anonymous: int = 401, agents: int = 401) -> dict:
    """A renter-API row: the users' statuses plus the anonymous and node-credential ones."""
    return {ANON: anonymous, OTHER_AGENT: agents, OWN_AGENT: agents, **statuses}


def every_user(status: int, *, read_only: int | None = None) -> dict:
    """An operation on the caller's own things (lists, creates): each user gets the same status."""
    return renter_api(
        statuses={
            A: status,
            A_READ: status if read_only is None else read_only,
            B: status,
            OWNER: status,
            STAFF: status,
        }
    )


def a_only(status: int, *, read_only: int | None = None) -> dict:
    """An operation on one of renter A's objects: everyone else who is a user gets a 404."""
    return renter_api(
        statuses={A: status, A_READ: status if read_only is None else read_only, B: 404, OWNER: 404, STAFF: 404}
    )


def agent_api(*, own: int, other: int) -> dict:
    """An agent-API row: every API key and anonymous get a 401."""
    return {ANON: 401, A: 401, A_READ: 401, B: 401, OWNER: 401, STAFF: 401, OTHER_AGENT: other, OWN_AGENT: own}


def usage_body(w):
    return {"samples": [{"seq": 99, "gpu_ms": 5000, "recorded_at": datetime.now(UTC).isoformat()}]}


def heartbeat_body(w):
    gpus = [{"index": 0, "uuid": "GPU-hb-0", "model": "H100", "vram_mb": 81920}]
    return {"gpus": gpus, "running": [str(w["allocation"].pk)]}


# (method, path template, body, {identity: status}). Placeholders name renter A's objects.
MATRIX = [
    ("GET", "/api/v1/offers", None, every_user(200)),
    ("GET", "/api/v1/jobs", None, every_user(200)),
    ("POST", "/api/v1/jobs", lambda w: JOB_SPEC, every_user(201, read_only=403)),
    ("GET", "/api/v1/jobs/{job}", None, a_only(200)),
    ("POST", "/api/v1/jobs/{job}/cancel", None, a_only(200, read_only=403)),
    ("GET", "/api/v1/jobs/{job}/events", None, a_only(200)),
    ("GET", "/api/v1/jobs/{job}/logs", None, a_only(200)),
    ("GET", "/api/v1/jobs/{job}/placements", None, a_only(200)),
    ("GET", "/api/v1/jobs/{job}/usage", None, a_only(200)),
    ("GET", "/api/v1/jobs/{job}/residency", None, a_only(200)),
    ("GET", "/api/v1/jobs/{job}/endpoint-tokens", None, a_only(200)),
    ("POST", "/api/v1/jobs/{job}/endpoint-tokens", lambda w: {"name": "matrix"}, a_only(201, read_only=403)),
    ("DELETE", "/api/v1/jobs/{job}/endpoint-tokens/{endpoint_token}", None, a_only(204, read_only=403)),
    ("GET", "/api/v1/api-keys", None, every_user(200)),
    ("POST", "/api/v1/api-keys", lambda w: {"name": "matrix"}, every_user(201, read_only=403)),
    ("DELETE", "/api/v1/api-keys/{key}", None, a_only(204, read_only=403)),
    ("GET", "/api/v1/secrets", None, every_user(200)),
    (
        "PUT",
        "/api/v1/secrets/{secret}",
        lambda w: {"value": "another value"},
        renter_api(statuses={A: 200, A_READ: 403, B: 201, OWNER: 201, STAFF: 201}),  # A's replaced, the others' own
    ),
    ("DELETE", "/api/v1/secrets/{secret}", None, a_only(204, read_only=403)),
    ("GET", "/api/v1/templates", None, every_user(200)),
    ("GET", "/api/v1/templates/{template}", None, a_only(200)),
    (
        "PUT",
        "/api/v1/templates/{template}",
        lambda w: JOB_SPEC,
        renter_api(statuses={A: 200, A_READ: 403, B: 201, OWNER: 201, STAFF: 201}),  # A's replaced, the others' own
    ),
    ("DELETE", "/api/v1/templates/{template}", None, a_only(204, read_only=403)),
    ("GET", "/api/v1/balance", None, every_user(200)),
    ("POST", "/api/v1/top-ups", lambda w: {"amount": "25.00"}, every_user(201, read_only=403)),
    ("GET", "/api/v1/top-ups/{topup}", None, a_only(200)),
    ("GET", "/api/v1/statements/usage", None, every_user(200)),
    ("GET", "/api/v1/statements/earnings", None, every_user(200)),
    ("POST", "/api/agent/v1/heartbeat", heartbeat_body, agent_api(own=200, other=200)),
    ("GET", "/api/agent/v1/assignments/next", None, agent_api(own=200, other=204)),
    ("POST", "/api/agent/v1/allocations/{allocation}/start", None, agent_api(own=200, other=404)),
    ("POST", "/api/agent/v1/allocations/{allocation}/secrets", None, agent_api(own=200, other=404)),
    (
        "POST",
        "/api/agent/v1/allocations/{allocation}/staging",
        lambda w: {"phase": "in", "ok": True, "files": [], "seconds": 0.5},
        agent_api(own=200, other=404),
    ),
    ("POST", "/api/agent/v1/allocations/{allocation}/usage", usage_body, agent_api(own=200, other=404)),
    (
        "POST",
        "/api/agent/v1/allocations/{allocation}/logs",
        lambda w: {"offset": len(SECRET_LOG.encode()), "data": "injected\n"},
        agent_api(own=200, other=404),
    ),
    (
        "POST",
        "/api/agent/v1/allocations/{allocation}/finish",
        lambda w: {"exit_code": 0, "reason": "exited"},
        agent_api(own=200, other=404),
    ),
]


@pytest.fixture
def world(db, owner, renter, stranger, staff, stripe_fake):
    """Renter A with a placed job (usage and logs recorded), a top-up and keys; renter B with a
    job; the owner's unit and another owner's unit, each with its agent credential; staff."""
    unit, own_credential = unit_online(owner, name="shed", gpus=4)
    secret_set(owner=renter, name="a-secret", value=SECRET_VALUE)
    template_save(owner=renter, name="a-template", spec={**JOB_SPEC, "name": "renter-a-template-marker"})
    job_a = job_make(renter, name="a-job", secrets={"A_TOKEN": "a-secret"})
    allocation = job_place(job_id=job_a.pk)
    assert allocation is not None and allocation.unit_id == unit.pk
    allocation_since(allocation, datetime.now(UTC) - timedelta(minutes=5))
    usage_record(allocation=allocation, samples=[SampleReport(seq=1, gpu_ms=60_000, recorded_at=datetime.now(UTC))])
    log_chunk_record(allocation=allocation, offset=0, data=SECRET_LOG)
    # Placed after A's job, so nothing of A's is on it.
    _, other_credential = unit_online(user_make("oscar-other-owner"), name="barn", gpus=2)
    job_b = job_make(stranger, name="b-job")
    topup = topup_create(renter=renter, amount_minor=2500)

    keys = {}
    for identity, user, scopes in [
        (A, renter, None),
        (A_READ, renter, ["read"]),
        (B, stranger, None),
        (OWNER, owner, None),
        (STAFF, staff, None),
    ]:
        keys[identity] = api_key_create(user=user, name=identity, scopes=scopes)
    spare_key, _ = api_key_create(user=renter, name="spare")
    endpoint_token, _ = endpoint_token_create(job=job_a, name="renter-a-endpoint-token", actor="test")

    clients = {ANON: APIClient(), OTHER_AGENT: agent_client(other_credential), OWN_AGENT: agent_client(own_credential)}
    for identity, (_, plaintext) in keys.items():
        clients[identity] = agent_client(plaintext)  # the same Bearer header

    owned_by = {
        str(job_a.pk): {A, A_READ, OWN_AGENT},
        str(allocation.pk): {A, A_READ, OWN_AGENT},
        SECRET_LOG.strip(): {A, A_READ},
        SECRET_VALUE: {OWN_AGENT},
        "renter-a-template-marker": {A, A_READ},  # the agent running A's job, and no one else, ever
        str(topup.pk): {A, A_READ},
        str(job_b.pk): {B},
        str(spare_key.pk): {A, A_READ},
        spare_key.lookup: {A, A_READ},
        str(endpoint_token.pk): {A, A_READ},
        "renter-a-endpoint-token": {A, A_READ},
    }
    for identity, (key, _) in keys.items():
        owned_by[str(key.pk)] = owned_by[key.lookup] = {identity, A, A_READ} if identity in (A, A_READ) else {identity}

    return {
        "renter": renter,
        "job": job_a,
        "job_b": job_b,
        "allocation": allocation,
        "topup": topup,
        "key": spare_key,
        "endpoint_token": endpoint_token,
        "clients": clients,
        "owned_by": owned_by,
    }


def a_world(renter) -> dict:
    """Everything of renter A's that a request could change, read from the database."""
    return {
        "jobs": list(Job.objects.filter(renter=renter).order_by("pk").values()),
        "allocations": list(Allocation.objects.filter(job__renter=renter).order_by("pk").values()),
        "logs": list(LogChunk.objects.filter(allocation__job__renter=renter).order_by("pk").values()),
        "usage": list(UsageSample.objects.filter(allocation__job__renter=renter).order_by("pk").values()),
        "events": AuditEvent.objects.filter(subject_id__in=Job.objects.filter(renter=renter).values("pk")).count(),
        "keys": list(ApiKey.objects.filter(user=renter).order_by("pk").values("pk", "name", "scopes", "revoked_at")),
        "topups": list(TopUp.objects.filter(renter=renter).order_by("pk").values()),
        "secrets": list(Secret.objects.filter(owner=renter).order_by("pk").values("pk", "name", "sealed")),
        "templates": list(JobTemplate.objects.filter(owner=renter).order_by("pk").values("pk", "name", "spec")),
        "balance": wallet_balance_micros(renter),
        "endpoint_tokens": list(
            EndpointToken.objects.filter(job__renter=renter).order_by("pk").values("pk", "name", "revoked_at")
        ),
    }


def concrete(template: str, w: dict) -> str:
    return template.format(
        job=w["job"].pk,
        key=w["key"].pk,
        topup=w["topup"].pk,
        allocation=w["allocation"].pk,
        secret="a-secret",
        template="a-template",
        endpoint_token=w["endpoint_token"].pk,
    )


def call(client: APIClient, method: str, path: str, body):
    return (
        getattr(client, method.lower())(path, body, format="json")
        if body is not None
        else getattr(client, method.lower())(path)
    )


CASES = [
    pytest.param(method, template, body, identity, expected, id=f"{method} {template} as {identity}")
    for method, template, body, statuses in MATRIX
    for identity, expected in statuses.items()
]


@pytest.mark.parametrize(("method", "template", "body", "identity", "expected"), CASES)
def test_the_matrix(world, method, template, body, identity, expected):
    before = a_world(world["renter"])
    sent = body(world) if body else None
    response = call(world["clients"][identity], method, concrete(template, world), sent)

    assert response.status_code == expected, response.content
    text = response.content.decode()
    # An id the caller sent itself is no disclosure when echoed: a heartbeat's "cancel" lists every
    # id in "running" that is not the unit's own, known or not.
    foreign = [
        marker
        for marker, owners in world["owned_by"].items()
        if identity not in owners and marker in text and marker not in json.dumps(sent)
    ]
    assert not foreign, f"{identity} was shown objects of others: {foreign}"
    if identity not in MAY_CHANGE_A:
        assert a_world(world["renter"]) == before, f"{identity} changed renter A's objects"


def test_every_row_names_every_identity():
    for method, template, _, statuses in MATRIX:
        assert set(statuses) == set(IDENTITIES), (method, template)


@pytest.mark.parametrize("identity", [A, A_READ, B, OWNER, STAFF])
def test_lists_hold_exactly_the_callers_own_objects(world, identity):
    user_of = {A: world["renter"], A_READ: world["renter"], B: world["job_b"].renter}
    client = world["clients"][identity]

    jobs = {job["id"] for job in client.get("/api/v1/jobs").json()["results"]}
    own_jobs = (
        set(Job.objects.filter(renter=user_of[identity]).values_list("pk", flat=True)) if identity in user_of else set()
    )
    assert jobs == {str(pk) for pk in own_jobs}

    keys = {key["id"] for key in client.get("/api/v1/api-keys").json()["results"]}
    caller = ApiKey.objects.get(name=identity).user
    assert keys == {str(pk) for pk in ApiKey.objects.filter(user=caller).values_list("pk", flat=True)}


def test_a_positive_control_for_the_jobs_lists(world):
    """The list test above is not vacuous: A and B do see their jobs."""
    assert [j["id"] for j in world["clients"][A].get("/api/v1/jobs").json()["results"]] == [str(world["job"].pk)]
    assert [j["id"] for j in world["clients"][B].get("/api/v1/jobs").json()["results"]] == [str(world["job_b"].pk)]


def api_routes() -> set[str]:
    """Every route under the API prefixes in the URL configuration, as Django spells it."""
    found = set()

    def walk(patterns, prefix: str):
        for pattern in patterns:
            route = prefix + str(pattern.pattern).lstrip("^")
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, route)
            else:
                found.add(route)

    walk(get_resolver().url_patterns, "")
    return {route for route in found if ("/" + route).startswith(PREFIXES)}


def shape(path: str) -> str:
    """A path with its parameters blanked and no trailing slash: /api/v1/jobs/{}/cancel."""
    return re.sub(r"\{[^}]+\}", "{}", path).rstrip("/")


SAMPLE = {"job": "0" * 8 + "-0000-0000-0000-" + "0" * 12}


def test_every_route_has_a_row():
    sample = {"job": SAMPLE["job"], "key": SAMPLE["job"], "topup": SAMPLE["job"], "allocation": SAMPLE["job"],
              "secret": "a-secret", "template": "a-template", "endpoint_token": SAMPLE["job"]}  # fmt: skip
    covered = {resolve(template.format(**sample)).route.lstrip("^") for _, template, _, _ in MATRIX}
    covered |= {resolve(path).route.lstrip("^") for _, path in EXCLUDED}
    assert api_routes() - covered == set(), "routes without a row in MATRIX"


def test_every_operation_has_a_row():
    schema = SchemaGenerator().get_schema(public=True)
    operations = {
        (method.upper(), shape(path))
        for path, item in schema["paths"].items()
        if path.startswith(PREFIXES)
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    rows = {(method, shape(template)) for method, template, _, _ in MATRIX}
    rows |= {(method, shape(path)) for method, path in EXCLUDED}
    assert operations - rows == set(), "operations without a row in MATRIX"
    assert rows - operations - {("POST", "/api/stripe/webhook")} == set(), "rows for operations that do not exist"
