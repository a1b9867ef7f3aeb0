"""The schema fuzzer again, over HTTP against the live web server (gunicorn, as deployed), for
every renter operation: what a generated client meets in production, headers and all.

``test_api_fuzz`` fuzzes every operation, the agent's too, in-process and in depth; this run is
shorter and proves the served schema and the served answers agree through the real server."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from marketplace.accounts.services import api_key_create
from tests.conftest import user_make
from tests.e2e import Renter
from tests.system.test_api_fuzz import AGENT_PREFIX, CHECKS, OPERATIONS, cases

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
EXAMPLES = 8
# The live stack has no Stripe account, so a valid top-up is the documented 503 problem saying
# so; any other 5xx is a failure.
PAYMENTS_UNAVAILABLE = "/problems/payments-unavailable"


@schemathesis.check
def no_server_error_but_payments_unavailable(ctx, response, case):
    if response.status_code == 503 and response.json().get("type") == PAYMENTS_UNAVAILABLE:
        return True
    return not_a_server_error(ctx, response, case)


LIVE_CHECKS = [no_server_error_but_payments_unavailable, *(c for c in CHECKS if c is not not_a_server_error)]


def test_the_live_server_answers_every_renter_operation_as_its_schema_says(running_stack):
    renter = user_make("fuzzing-renter")
    _, api_key = api_key_create(user=renter, name="live-fuzz")
    spare, _ = api_key_create(user=renter, name="spare")  # the one DELETE may revoke
    job = Renter(running_stack.base_url, api_key).submit(image="docker.io/library/python:3.12-slim", command=["true"])
    known = {"/api/v1/jobs/{id}/": ("id", job["id"]), "/api/v1/api-keys/{id}/": ("id", str(spare.pk))}
    schema = schemathesis.openapi.from_url(f"{running_stack.base_url}/api/schema/")
    headers = {"Authorization": f"Bearer {api_key}"}

    fuzzed = []
    for method, path in OPERATIONS:
        if path.startswith(AGENT_PREFIX):
            continue
        operation = schema[path][method]
        found = next((value for prefix, value in known.items() if path.startswith(prefix)), None)

        @given(case=cases(operation, found))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def fuzz(case):
            case.call_and_validate(headers=headers, checks=LIVE_CHECKS, timeout=30)

        fuzz()
        fuzzed.append((method, path))
    assert len(fuzzed) >= 15, fuzzed
