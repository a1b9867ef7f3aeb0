"""The schema fuzzer again, over HTTP against the live web server (gunicorn with uvicorn workers,
as deployed), for every operation, the agent's with a node credential: what a generated client
meets in production, headers and all, and no answer slower than a second.

``test_api_fuzz`` fuzzes every operation in-process and in depth; this run is shorter and proves
the served schema and the served answers agree through the real server.

Long polls: this stack runs with no wait slots (LONG_POLL_WAITS_PER_KEY and _PER_UNIT are 0), so
a generated ``wait`` is parsed and bounded like any parameter but answered at once, and the one
second bound holds for every response without exception. That waits themselves hold nothing
up is proven in tests/system/test_attacks_input.py."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from marketplace.accounts.services import api_key_create
from marketplace.jobs.models import Allocation
from marketplace.jobs.placement import job_place
from tests.conftest import job_make, unit_online, user_make
from tests.e2e import free_port, stack_start, wait_until
from tests.system.test_api_fuzz import AGENT_PREFIX, CHECKS, OPERATIONS, cases, known_id

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
EXAMPLES = 8
SLOWEST_ANSWER_S = 1.0
# The live stack has no Stripe account, so a valid top-up is the documented 503 problem saying
# so; any other 5xx is a failure.
PAYMENTS_UNAVAILABLE = "/problems/payments-unavailable"


@schemathesis.check
def no_server_error_but_payments_unavailable(ctx, response, case):
    if response.status_code == 503 and response.json().get("type") == PAYMENTS_UNAVAILABLE:
        return True
    return not_a_server_error(ctx, response, case)


@schemathesis.check
def answered_within_a_second(ctx, response, case):
    assert response.elapsed <= SLOWEST_ANSWER_S, f"{case.method} {case.formatted_path} took {response.elapsed:.2f} s"


LIVE_CHECKS = [
    no_server_error_but_payments_unavailable,
    answered_within_a_second,
    *(c for c in CHECKS if c is not not_a_server_error),
]


@pytest.fixture
def fuzz_stack(tmp_path):
    stack = stack_start(tmp_path, port=free_port(), LONG_POLL_WAITS_PER_KEY="0", LONG_POLL_WAITS_PER_UNIT="0")
    yield stack
    stack.stop_all()


def test_the_live_server_answers_every_operation_as_its_schema_says_within_a_second(fuzz_stack):
    owner, renter = user_make("fuzzing-owner"), user_make("fuzzing-renter")
    _, api_key = api_key_create(user=renter, name="live-fuzz")
    spare, _ = api_key_create(user=renter, name="spare")  # the one DELETE may revoke
    _, credential = unit_online(owner, name="fuzz-shed", gpus=4)
    job = job_make(renter)
    # The stack's worker may place it first (the submit asks it to): then its allocation is the one.
    allocation = job_place(job_id=job.pk) or wait_until(
        lambda: Allocation.objects.filter(job=job).first(), timeout=30, what="the worker's placement"
    )
    ids = {
        "/api/v1/jobs/{id}/": ("id", str(job.pk)),
        "/api/v1/api-keys/{id}/": ("id", str(spare.pk)),
        "/api/agent/v1/allocations/{allocation_id}/": ("allocation_id", str(allocation.pk)),
    }
    schema = schemathesis.openapi.from_url(f"{fuzz_stack.base_url}/api/schema/")

    fuzzed = []
    for method, path in OPERATIONS:
        operation = schema[path][method]
        token = credential if path.startswith(AGENT_PREFIX) else api_key

        @given(case=cases(operation, known_id(ids, path)))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def fuzz(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=LIVE_CHECKS, timeout=30)  # noqa: B023

        fuzz()
        fuzzed.append((method, path))
    assert len(fuzzed) == len(OPERATIONS) >= 24
    assert sum(path.startswith(AGENT_PREFIX) for _, path in fuzzed) >= 7
