"""Real processes: an agent whose configured country contradicts the unit's declared one is sent
no residency-restricted job (it would refuse it), and its owner is told why."""

import pytest

from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from marketplace.jobs.models import Allocation
from marketplace.kernel.models import AuditEvent
from nodes.models import Unit
from nodes.services import unit_register
from tests.conftest import user_make
from tests.e2e import Renter, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_unit_whose_agent_names_another_country_gets_no_restricted_job(running_stack, tmp_path, client):
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

    reported = AuditEvent.objects.get(action="unit.agent_country_reported", subject_id=unit.pk)
    shopper = Renter(stack.base_url, api_key)
    job = shopper.submit(image="busybox", command=["touch", str(marker)], jurisdictions=["DE"])
    pending = wait_until(
        lambda: (found := shopper.job(job["id"]))["pending_reason"].get("rejected") and found,
        timeout=30,
        what=f"the job pending\n{stack.log('worker')[-3000:]}",
    )

    assert reported.data == {"country": "FR", "previous": "", "declared": "DE"}
    assert pending["state"] == "queued"
    assert pending["pending_reason"]["rejected"] == {"agent_country": 1}
    assert not Allocation.objects.filter(job_id=job["id"]).exists()  # never sent, so never refused
    assert not marker.exists()
    client.force_login(owner)
    page = client.get(f"/portal/units/{unit.pk}/").content.decode()
    assert "The agent is configured for France (FR), but the unit is declared in Germany (DE)" in page
