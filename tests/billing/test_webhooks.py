import json
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from billing.models import Account, BillingProfile, LedgerTransaction, TopUp, WebhookEvent
from billing.outbox import outbox_enqueue, outbox_send
from billing.payouts import connect_account_ensure
from billing.selectors import connect_status, wallet_balance_micros
from billing.services import account_balance, account_for
from billing.stripe_api import client as stripe_client
from billing.topups import topup_create
from billing.webhooks import webhook_process, webhook_sweep
from marketplace.kernel.models import AuditEvent
from tests.conftest import problem_of
from tests.stripe_fake import sign

pytestmark = pytest.mark.django_db

URL = "/api/stripe/webhook"


def deliver(client, event: dict, *, secret: str | None = None, timestamp: int | None = None):
    """POST the event as Stripe would, signed with ``secret`` (the stripe_fake fixture's by default)."""
    secret = secret or settings.STRIPE_WEBHOOK_SECRETS[0]
    body = json.dumps(event).encode()
    return client.post(
        URL, data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign(body, secret, timestamp=timestamp)
    )


def deliver_and_process(client, event: dict) -> bool:
    assert deliver(client, event).status_code == 200
    return webhook_process(event_id=event["id"])


def credited_micros(amount_minor: int) -> int:
    return amount_minor * settings.MICROS_PER_MINOR


@pytest.fixture
def topup(renter, stripe_fake):
    return topup_create(renter=renter, amount_minor=2500)


class TestPaymentSucceeded:
    def test_credits_the_wallet_from_stripe_clearing(self, client, topup, renter, stripe_fake):
        event = stripe_fake.event("payment_intent.succeeded", stripe_fake.succeed_payment(topup.payment_intent_id))

        assert deliver_and_process(client, event)

        topup.refresh_from_db()
        assert topup.state == TopUp.State.SUCCEEDED
        assert topup.credited.key == f"topup:{topup.id}"
        assert topup.credited.kind == "top_up"
        assert wallet_balance_micros(renter) == credited_micros(2500)
        assert account_balance(account_for(Account.Kind.STRIPE_CLEARING)) == -credited_micros(2500)
        assert WebhookEvent.objects.get(event_id=event["id"]).processed_at is not None

    def test_is_processed_on_commit_not_in_the_request(
        self, client, topup, renter, stripe_fake, django_capture_on_commit_callbacks
    ):
        event = stripe_fake.event("payment_intent.succeeded", stripe_fake.succeed_payment(topup.payment_intent_id))
        with django_capture_on_commit_callbacks() as scheduled:
            response = deliver(client, event)
        assert (response.status_code, len(scheduled)) == (200, 1)
        assert wallet_balance_micros(renter) == 0

    def test_a_duplicate_delivery_stores_nothing_new_and_credits_once(
        self, client, topup, renter, stripe_fake, django_capture_on_commit_callbacks
    ):
        event = stripe_fake.event("payment_intent.succeeded", stripe_fake.succeed_payment(topup.payment_intent_id))
        assert deliver_and_process(client, event)
        with django_capture_on_commit_callbacks() as scheduled:
            assert deliver_and_process(client, event)
        assert scheduled == []
        assert WebhookEvent.objects.filter(event_id=event["id"]).count() == 1
        assert LedgerTransaction.objects.filter(kind="top_up").count() == 1
        assert AuditEvent.objects.filter(action="topup.succeeded", subject_id=topup.id).count() == 1
        assert wallet_balance_micros(renter) == credited_micros(2500)

    def test_two_events_for_one_payment_credit_once(self, client, topup, renter, stripe_fake):
        paid = stripe_fake.succeed_payment(topup.payment_intent_id)
        assert deliver_and_process(client, stripe_fake.event("payment_intent.succeeded", paid))
        assert deliver_and_process(client, stripe_fake.event("payment_intent.succeeded", paid))
        assert wallet_balance_micros(renter) == credited_micros(2500)
        assert AuditEvent.objects.filter(action="topup.succeeded", subject_id=topup.id).count() == 1

    def test_a_snapshot_is_not_trusted(self, client, topup, renter, stripe_fake):
        # A "succeeded" event for a PaymentIntent Stripe says is still unpaid credits nothing.
        forged = {**stripe_fake.get("payment_intent", topup.payment_intent_id), "status": "succeeded"}
        assert deliver_and_process(client, stripe_fake.event("payment_intent.succeeded", forged))
        assert wallet_balance_micros(renter) == 0
        assert TopUp.objects.get(pk=topup.pk).state == TopUp.State.AWAITING_PAYMENT


class TestOrdering:
    def test_a_failure_delivered_after_the_success_leaves_it_credited(self, client, topup, renter, stripe_fake):
        failed = stripe_fake.event("payment_intent.payment_failed", stripe_fake.fail_payment(topup.payment_intent_id))
        succeeded = stripe_fake.event("payment_intent.succeeded", stripe_fake.succeed_payment(topup.payment_intent_id))

        assert deliver_and_process(client, succeeded)
        assert deliver_and_process(client, failed)

        topup.refresh_from_db()
        assert topup.state == TopUp.State.SUCCEEDED
        assert wallet_balance_micros(renter) == credited_micros(2500)

    def test_a_declined_card_fails_the_top_up_until_a_retry_pays(self, client, topup, renter, stripe_fake):
        failed = stripe_fake.event("payment_intent.payment_failed", stripe_fake.fail_payment(topup.payment_intent_id))
        assert deliver_and_process(client, failed)
        assert TopUp.objects.get(pk=topup.pk).state == TopUp.State.FAILED
        assert wallet_balance_micros(renter) == 0

        paid = stripe_fake.event("payment_intent.succeeded", stripe_fake.succeed_payment(topup.payment_intent_id))
        assert deliver_and_process(client, paid)
        assert TopUp.objects.get(pk=topup.pk).state == TopUp.State.SUCCEEDED
        assert wallet_balance_micros(renter) == credited_micros(2500)

    def test_a_canceled_payment_fails_the_top_up(self, client, topup, renter, stripe_fake):
        canceled = stripe_client().v1.payment_intents.cancel(topup.payment_intent_id).to_dict()
        assert deliver_and_process(client, stripe_fake.event("payment_intent.canceled", canceled))
        assert TopUp.objects.get(pk=topup.pk).state == TopUp.State.FAILED

    def test_a_webhook_that_beats_our_commit_is_processed_later_and_credited_once(self, client, renter, stripe_fake):
        topup_id = uuid.uuid4()
        customer = stripe_client().v1.customers.create().id
        intent = stripe_client().v1.payment_intents.create(
            params={"amount": 2500, "currency": "usd", "customer": customer, "metadata": {"topup_id": str(topup_id)}}
        )
        event = stripe_fake.event("payment_intent.succeeded", stripe_fake.succeed_payment(intent.id))

        assert not deliver_and_process(client, event)
        stored = WebhookEvent.objects.get(event_id=event["id"])
        assert (stored.processed_at, stored.attempts) == (None, 1)
        assert "not there yet" in stored.last_error

        TopUp.objects.create(id=topup_id, renter=renter, amount_minor=2500, payment_intent_id=intent.id)
        assert webhook_sweep() == 0  # the sweep leaves events younger than a minute to the task's retries
        WebhookEvent.objects.filter(pk=stored.pk).update(received_at=timezone.now() - timedelta(minutes=2))
        assert webhook_sweep() == 1
        assert webhook_sweep() == 0

        assert WebhookEvent.objects.get(pk=stored.pk).processed_at is not None
        assert TopUp.objects.get(pk=topup_id).state == TopUp.State.SUCCEEDED
        assert wallet_balance_micros(renter) == credited_micros(2500)
        assert webhook_process(event_id=event["id"])
        assert LedgerTransaction.objects.filter(kind="top_up").count() == 1

    def test_stripe_unreachable_while_processing_leaves_the_event_for_later(self, client, topup, stripe_fake):
        event = stripe_fake.event("payment_intent.succeeded", stripe_fake.succeed_payment(topup.payment_intent_id))
        stripe_fake.fail_next("/v1/payment_intents", "server_error")
        assert not deliver_and_process(client, event)
        assert WebhookEvent.objects.get(event_id=event["id"]).attempts == 1
        assert webhook_process(event_id=event["id"])
        assert TopUp.objects.get(pk=topup.pk).state == TopUp.State.SUCCEEDED


class TestSignature:
    @pytest.fixture
    def event(self, stripe_fake):
        return stripe_fake.event("customer.created", {"id": "cus_123", "object": "customer"})

    def test_a_bad_signature_is_a_400_problem(self, client, event):
        body = problem_of(deliver(client, event, secret="whsec_someone_else"), 400)
        assert body["type"] == "/problems/webhook-signature-invalid"
        assert not WebhookEvent.objects.exists()

    def test_a_body_changed_after_signing_is_refused(self, client, event):
        body = json.dumps(event).encode()
        header = sign(body, "whsec_test_current")
        tampered = body.replace(b"cus_123", b"cus_999")
        problem_of(client.post(URL, data=tampered, content_type="application/json", HTTP_STRIPE_SIGNATURE=header), 400)

    @pytest.mark.parametrize("header", [None, "", "garbage", "t=notanumber,v1=abc"])
    def test_a_missing_or_malformed_header_is_a_400_problem(self, client, event, header):
        extra = {} if header is None else {"HTTP_STRIPE_SIGNATURE": header}
        problem_of(client.post(URL, data=json.dumps(event), content_type="application/json", **extra), 400)

    def test_a_stale_timestamp_is_refused(self, client, event):
        stale = int(time.time()) - settings.STRIPE_WEBHOOK_TOLERANCE_S - 5
        body = problem_of(deliver(client, event, timestamp=stale), 400)
        assert "tolerance" in body["detail"]
        fresh = int(time.time()) - settings.STRIPE_WEBHOOK_TOLERANCE_S + 30
        assert deliver(client, event, timestamp=fresh).status_code == 200

    def test_during_a_rotation_both_secrets_hold_and_a_removed_one_does_not(self, client, stripe_fake, settings):
        settings.STRIPE_WEBHOOK_SECRETS = ["whsec_new", "whsec_old"]
        signed_old = stripe_fake.event("customer.created", {"id": "cus_1", "object": "customer"})
        signed_new = stripe_fake.event("customer.created", {"id": "cus_2", "object": "customer"})
        assert deliver(client, signed_old, secret="whsec_old").status_code == 200
        assert deliver(client, signed_new, secret="whsec_new").status_code == 200

        settings.STRIPE_WEBHOOK_SECRETS = ["whsec_new"]
        late = stripe_fake.event("customer.created", {"id": "cus_3", "object": "customer"})
        problem_of(deliver(client, late, secret="whsec_old"), 400)
        assert WebhookEvent.objects.count() == 2

    def test_no_configured_secret_refuses_everything(self, client, event, settings):
        settings.STRIPE_WEBHOOK_SECRETS = []
        problem_of(deliver(client, event, secret="whsec_test_current"), 400)

    def test_a_signed_body_that_is_not_an_event_is_refused(self, client):
        for body in (b"not json", b"[]", b'{"id": "evt_1"}', b"\xff\xfe"):
            response = client.post(
                URL, data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign(body, "whsec_test_current")
            )
            problem_of(response, 400)

    def test_only_post_is_accepted(self, client, stripe_fake):
        problem_of(client.get(URL), 405)


class TestOtherEvents:
    def test_connect_account_updated_sets_payouts_enabled_from_stripe(self, client, owner, stripe_fake):
        BillingProfile.objects.create(user=owner)
        message = outbox_send(outbox_enqueue(operation="accounts.create", payload={"type": "express"}, user=owner).id)
        account_id = BillingProfile.objects.get(user=owner).stripe_account_id
        assert account_id == message.stripe_id
        snapshot = stripe_fake.get("account", account_id)  # taken before onboarding finished
        stripe_fake.account_update(account_id, payouts_enabled=True, details_submitted=True)

        event = stripe_fake.event("account.updated", snapshot, account=account_id)
        assert deliver_and_process(client, event)

        assert WebhookEvent.objects.get(event_id=event["id"]).account == account_id
        assert BillingProfile.objects.get(user=owner).payouts_enabled is True

    def test_connect_account_updated_keeps_what_a_restricted_account_still_needs(self, client, owner, stripe_fake):
        account_id = connect_account_ensure(owner=owner)
        requirements = {"past_due": ["external_account"], "currently_due": ["individual.dob.day", "external_account"]}
        stripe_fake.account_update(
            account_id,
            details_submitted=True,
            requirements={**requirements, "disabled_reason": "requirements.past_due"},
        )

        event = stripe_fake.event("account.updated", stripe_fake.get("account", account_id), account=account_id)
        assert deliver_and_process(client, event)

        profile = BillingProfile.objects.get(user=owner)
        assert (profile.payouts_enabled, profile.details_submitted) == (False, True)
        assert profile.requirements_due == ["external_account", "individual.dob.day"]
        assert profile.disabled_reason == "requirements.past_due"
        status = connect_status(owner)  # what the earnings page shows, without asking Stripe
        assert (status.state, status.needs) == ("restricted", ("external_account", "individual.dob.day"))

    def test_platform_events_have_no_account_and_unknown_types_are_stored_and_processed(self, client, stripe_fake):
        event = stripe_fake.event("invoice.finalized", {"id": "in_1", "object": "invoice"})
        assert deliver_and_process(client, event)
        stored = WebhookEvent.objects.get(event_id=event["id"])
        assert (stored.type, stored.account, stored.payload) == ("invoice.finalized", "", event)
        assert stored.processed_at is not None


class TestBoundedAttempts:
    """An event that cannot be processed ends failed, with its reason, instead of being tried forever."""

    def age(self, event: dict) -> None:
        WebhookEvent.objects.filter(event_id=event["id"]).update(received_at=timezone.now() - timedelta(minutes=5))

    @pytest.mark.parametrize(
        ("event_type", "obj"),
        [
            ("payment_intent.succeeded", {"object": "payment_intent"}),
            ("account.updated", {"object": "account", "id": ""}),
            ("charge.refunded", {"object": "charge", "id": 42}),
            ("charge.dispute.created", None),
        ],
    )
    def test_a_signed_event_without_an_object_id_fails_at_once(self, client, stripe_fake, event_type, obj):
        event = stripe_fake.event(event_type, obj or {})
        if obj is None:
            event["data"] = "not an object"

        assert deliver_and_process(client, event)  # done with: nothing more to try

        stored = WebhookEvent.objects.get(event_id=event["id"])
        assert stored.failed_at is not None and stored.processed_at is None
        assert (stored.attempts, stored.last_error) == (1, "Malformed: The event has no data.object.id.")
        self.age(event)
        assert webhook_sweep() == 0

    def test_an_event_that_keeps_failing_fails_after_the_most_attempts(self, client, topup, stripe_fake, monkeypatch):
        monkeypatch.setattr("billing.webhooks.WEBHOOK_MAX_ATTEMPTS", 3)
        event = stripe_fake.event("payment_intent.succeeded", stripe_fake.succeed_payment(topup.payment_intent_id))
        assert deliver(client, event).status_code == 200
        self.age(event)
        for _ in range(5):
            stripe_fake.fail_next("/v1/payment_intents", "server_error")
            webhook_sweep()

        stored = WebhookEvent.objects.get(event_id=event["id"])
        assert stored.attempts == 3 and stored.failed_at is not None
        assert "server_error" in stored.last_error or "APIError" in stored.last_error
        assert TopUp.objects.get(pk=topup.pk).state != TopUp.State.SUCCEEDED

    def test_an_unexpected_error_counts_as_an_attempt_too(self, client, stripe_fake, monkeypatch):
        def broken(event):
            raise TypeError("a bug")

        monkeypatch.setattr("billing.webhooks._handler", lambda event_type: broken)
        monkeypatch.setattr("billing.webhooks.WEBHOOK_MAX_ATTEMPTS", 2)
        event = stripe_fake.event("invoice.finalized", {"id": "in_1", "object": "invoice"})

        assert not deliver_and_process(client, event)
        assert webhook_process(event_id=event["id"])

        stored = WebhookEvent.objects.get(event_id=event["id"])
        assert (stored.attempts, stored.last_error) == (2, "TypeError: a bug")
        assert stored.failed_at is not None
