"""Schema-driven fuzzing of the whole API (renter and agent) with schemathesis, in-process over WSGI.

Every operation in ``/api/schema/`` is called with generated requests, valid and invalid, and each
response must not be a server error and must match the schema (status code, content type, headers
and body). Renter operations run as a renter with an API key, a job and a top-up; agent
operations run as the node agent of the unit that job is placed on. Path parameters are the real
objects' ids half of the time, so the fuzzer reaches the success responses too, not only 404s.
"""

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from billing.topups import topup_create
from marketplace.accounts.services import api_key_create
from marketplace.jobs.placement import job_place
from tests.conftest import job_make, unit_online

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
AGENT_PREFIX = "/api/agent/v1/"
# The operations the schema must offer: the fuzzer covers all of them, so a view that drops out of
# the schema (and with it out of the fuzzing) fails here instead of going quiet.
OPERATIONS_AT_LEAST = 24
MAX_EXAMPLES = 25


@pytest.fixture
def world(db, settings, stripe_fake, owner, renter):
    """A renter with a key, a job placed on an online unit, a spare key and a top-up waiting for payment."""
    settings.ALLOWED_HOSTS = ["*"]
    settings.API_RATE_LIMIT = "100000/min"
    settings.API_SUBMIT_RATE_LIMIT = "100000/min"
    # Long polls answer at once (no wait slots): the fuzzer sends many, and what they wait for
    # never comes here.
    settings.LONG_POLL_WAITS_PER_KEY = settings.LONG_POLL_WAITS_PER_UNIT = 0
    unit, credential = unit_online(owner, name="fuzz-shed", gpus=4)
    job = job_make(renter)
    allocation = job_place(job_id=job.pk)
    assert allocation is not None
    _, renter_key = api_key_create(user=renter, name="fuzz")
    spare_key, _ = api_key_create(user=renter, name="spare")  # the one DELETE may revoke
    topup = topup_create(renter=renter, amount_minor=2500)
    assert topup.client_secret
    return {
        "renter_key": renter_key,
        "credential": credential,
        "ids": {
            "/api/v1/jobs/{id}/": ("id", str(job.pk)),
            "/api/v1/api-keys/{id}/": ("id", str(spare_key.pk)),
            "/api/v1/top-ups/{topup_id}": ("topup_id", str(topup.pk)),
            "/api/agent/v1/allocations/{allocation_id}/": ("allocation_id", str(allocation.pk)),
        },
    }


def known_id(ids: dict, path: str):
    return next((found for prefix, found in ids.items() if path.startswith(prefix)), None)


def operations_listed() -> list[tuple[str, str]]:
    """(METHOD, path) of every operation, read from the schema generator at collection time."""
    from drf_spectacular.generators import SchemaGenerator

    paths = SchemaGenerator().get_schema(request=None, public=True)["paths"]
    return sorted((method.upper(), path) for path, methods in paths.items() for method in methods)


OPERATIONS = operations_listed()


@pytest.fixture
def wsgi_app():
    """The project's WSGI application, kept from closing the test's connection after each request
    (the test client does the same): the test's transaction, and the data in it, must survive."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield get_wsgi_application()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def api_schema(world, wsgi_app):
    """The schema as the running application serves it, not as the generator makes it."""
    return schemathesis.openapi.from_wsgi("/api/schema/", wsgi_app)


def cases(operation, known: tuple[str, str] | None):
    strategies = [operation.as_strategy(mode) for mode in GenerationMode]
    if known is not None:
        name, value = known
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters={name: value}))
    return st.one_of(strategies)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_operation_conforms_to_its_schema(method, path, api_schema, world):
    operation = api_schema[path][method]
    agent = path.startswith(AGENT_PREFIX)
    headers = {"Authorization": f"Bearer {world['credential'] if agent else world['renter_key']}"}

    @given(case=cases(operation, known_id(world["ids"], path)))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def fuzz(case):
        case.call_and_validate(headers=headers, checks=CHECKS)

    fuzz()


def test_every_operation_is_fuzzed(api_schema, world):
    served = sorted((result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations())
    assert served == OPERATIONS
    assert len(OPERATIONS) >= OPERATIONS_AT_LEAST
    assert any(path.startswith(AGENT_PREFIX) for _, path in OPERATIONS)
    for prefix in world["ids"]:
        assert any(path.startswith(prefix) for _, path in OPERATIONS), prefix
