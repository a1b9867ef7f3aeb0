"""Real processes: an agent whose own location contradicts what the server believes refuses the job."""

import pytest

from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from marketplace.kernel.models import AuditEvent
from nodes.models import Unit
from nodes.services import unit_register
from tests.conftest import user_make
from tests.e2e import Renter, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_an_agent_refuses_a_job_its_own_location_rules_out_and_it_is_not_sent_again(running_stack, tmp_path):
    stack = running_stack
    owner, renter = user_make("olivia-owner"), user_make("rita-renter")
    wallet_credit_promotional(user=renter, amount_micros=50_000_000, key="e2e-credit")  # the stack checks wallets
    # The server believes the unit is in Germany; its owner configured the agent in France.
    unit, token = unit_register(owner=owner, name="Border shed", country="DE")
    _, api_key = api_key_create(user=renter, name="e2e")
    config = str(tmp_path / "agent" / "agent.json")
    marker = tmp_path / "ran"

    enrol = ("enrol", "--url", stack.base_url, "--token", token, "--config", config, "--country", "FR")
    assert stack.run(devstack.agent_argv(*enrol)).returncode == 0
    stack.start(
        "agent",
        devstack.agent_argv(
            "run", "--config", config, "--simulate", "1xH100-80GB",
            "--work-dir", str(tmp_path / "agent" / "work"), "--dev-runtime",
        ),
    )  # fmt: skip
    wait_until(lambda: Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE, timeout=30, what="the unit online")

    shopper = Renter(stack.base_url, api_key)
    job = shopper.submit(image="busybox", command=["touch", str(marker)], jurisdictions=["DE"])
    refused = wait_until(
        lambda: AuditEvent.objects.filter(action="allocation.refused", subject_id=job["id"]).first(),
        timeout=30,
        what=f"the refusal\n{stack.log('agent')[-3000:]}",
    )
    pending = wait_until(
        lambda: (found := shopper.job(job["id"]))["pending_reason"].get("rejected") and found,
        timeout=15,
        what="the job pending again",
    )

    assert refused.data["reason"] == "refused:residency"
    assert pending["state"] == "queued"
    assert pending["pending_reason"]["rejected"] == {"unit_refused": 1}
    assert not marker.exists()
    assert "event=assignment_refused" in stack.log("agent")
