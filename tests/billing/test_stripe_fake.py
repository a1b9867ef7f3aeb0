"""The fake Stripe, driven through the official SDK exactly as the app drives the real one."""

import json
import time
from unittest.mock import ANY

import pytest
import stripe
from django.core.exceptions import ImproperlyConfigured

from billing import stripe_api
from tests.stripe_fake import FakeStripe, parse_params, sign


def topup_intent(client, key: str | None = None, *, amount: int = 2500) -> stripe.PaymentIntent:
    return client.v1.payment_intents.create(
        {
            "amount": amount,
            "currency": "usd",
            "metadata": {"topup_id": "41"},
            "automatic_payment_methods": {"enabled": True},
        },
        {"idempotency_key": key} if key else None,
    )


def onboarded_account(client, fake: FakeStripe) -> str:
    account = client.v1.accounts.create({"type": "express", "capabilities": {"transfers": {"requested": True}}})
    fake.account_update(account.id, details_submitted=True, payouts_enabled=True)
    return account.id


def test_client_without_a_key_or_a_fake_says_what_to_set(settings):
    settings.STRIPE_SECRET_KEY = ""
    stripe_api.uninstall()
    with pytest.raises(ImproperlyConfigured, match="STRIPE_SECRET_KEY"):
        stripe_api.client()


def test_client_never_retries_on_its_own(stripe_fake):
    stripe_fake.fail_next("/v1/customers", "server_error")
    with pytest.raises(stripe.APIError):
        stripe_api.client().v1.customers.create({"email": "rita@example.com"})
    assert len(stripe_fake.calls) == 1
    assert stripe_fake.objects("customer") == []


def test_nested_form_parameters_are_decoded():
    params = parse_params("metadata%5Btopup_id%5D=7&automatic_payment_methods%5Benabled%5D=true&expand%5B0%5D=x")
    assert params == {"metadata": {"topup_id": "7"}, "automatic_payment_methods": {"enabled": "true"}, "expand": ["x"]}


def test_a_payment_intent_is_created_and_retrieved(stripe_fake):
    client = stripe_api.client()
    customer = client.v1.customers.create({"email": "rita@example.com", "metadata": {"user_id": "3"}})
    intent = client.v1.payment_intents.create(
        {"amount": 2500, "currency": "usd", "customer": customer.id, "metadata": {"topup_id": "41"}}
    )

    fetched = client.v1.payment_intents.retrieve(intent.id)
    assert fetched.id.startswith("pi_")
    assert fetched.status == "requires_payment_method"
    assert fetched.client_secret.startswith(f"{intent.id}_secret_")
    assert (fetched.amount, fetched.customer, fetched.metadata["topup_id"]) == (2500, customer.id, "41")
    assert fetched.livemode is False
    assert client.v1.customers.retrieve(customer.id).email == "rita@example.com"
    assert [pi.id for pi in client.v1.payment_intents.list({"customer": customer.id})] == [intent.id]


def test_retrieving_a_missing_object_is_a_stripe_404(stripe_fake):
    with pytest.raises(stripe.InvalidRequestError) as raised:
        stripe_api.client().v1.payment_intents.retrieve("pi_nope")
    assert raised.value.http_status == 404
    assert raised.value.code == "resource_missing"


def test_an_unknown_path_is_a_stripe_404(stripe_fake):
    with pytest.raises(stripe.InvalidRequestError) as raised:
        stripe_api.client().raw_request("post", "/v1/not_a_thing", a="b")
    assert raised.value.http_status == 404


def test_succeeding_and_failing_payments_set_status_and_charge(stripe_fake):
    client = stripe_api.client()
    paid, declined = topup_intent(client), topup_intent(client)

    stripe_fake.succeed_payment(paid.id)
    stripe_fake.fail_payment(declined.id)

    paid, declined = client.v1.payment_intents.retrieve(paid.id), client.v1.payment_intents.retrieve(declined.id)
    assert (paid.status, paid.amount_received) == ("succeeded", 2500)
    assert paid.latest_charge.startswith("ch_")
    assert declined.status == "requires_payment_method"
    assert declined.last_payment_error.code == "card_declined"
    assert declined.latest_charge.startswith("ch_")


def test_a_replayed_request_returns_the_first_object_and_creates_nothing(stripe_fake):
    client = stripe_api.client()
    first = topup_intent(client, "topup-41")
    again = topup_intent(client, "topup-41")

    assert again.id == first.id
    assert again.client_secret == first.client_secret
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(stripe_fake.objects("payment_intent")) == 1
    assert [call.idempotency_key for call in stripe_fake.calls] == ["topup-41", "topup-41"]


def test_a_reused_key_with_other_parameters_is_an_idempotency_error(stripe_fake):
    client = stripe_api.client()
    topup_intent(client, "topup-41")
    with pytest.raises(stripe.IdempotencyError):
        topup_intent(client, "topup-41", amount=9900)
    assert len(stripe_fake.objects("payment_intent")) == 1


def test_a_timeout_after_apply_is_a_connection_error_and_the_retry_finds_the_object(stripe_fake):
    client = stripe_api.client()
    stripe_fake.fail_next("/v1/payment_intents", "timeout_after_apply")

    with pytest.raises(stripe.APIConnectionError):
        topup_intent(client, "topup-41")
    assert len(stripe_fake.objects("payment_intent")) == 1

    retried = topup_intent(client, "topup-41")
    assert retried.id == stripe_fake.objects("payment_intent")[0]["id"]
    assert len(stripe_fake.objects("payment_intent")) == 1


def test_a_timeout_before_apply_stores_nothing(stripe_fake):
    stripe_fake.fail_next("/v1/payment_intents", "timeout_before_apply", times=2)
    client = stripe_api.client()
    for _ in range(2):
        with pytest.raises(stripe.APIConnectionError):
            topup_intent(client, "topup-41")
    assert stripe_fake.objects("payment_intent") == []
    topup_intent(client, "topup-41")
    assert len(stripe_fake.objects("payment_intent")) == 1


def test_a_rate_limit_is_a_429_with_retry_after(stripe_fake):
    stripe_fake.fail_next("/v1/", "rate_limit")
    with pytest.raises(stripe.RateLimitError) as raised:
        stripe_api.client().v1.customers.create({"email": "rita@example.com"})
    assert raised.value.http_status == 429
    assert raised.value.json_body["error"]["code"] == "rate_limit"
    assert raised.value.headers["Retry-After"] == "1"
    assert stripe_fake.objects("customer") == []


def test_a_transfer_beyond_the_available_balance_is_refused(stripe_fake):
    client = stripe_api.client()
    destination = onboarded_account(client, stripe_fake)
    stripe_fake.available = 1000

    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.transfers.create({"amount": 1001, "currency": "usd", "destination": destination})
    assert raised.value.code == "balance_insufficient"
    assert raised.value.http_status == 400
    assert stripe_fake.objects("transfer") == []

    client.v1.transfers.create({"amount": 1000, "currency": "usd", "destination": destination})
    assert stripe_fake.available == 0


def test_a_transfer_to_an_account_that_has_not_onboarded_is_refused(stripe_fake):
    client = stripe_api.client()
    account = client.v1.accounts.create({"type": "express", "capabilities": {"transfers": {"requested": True}}})
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.transfers.create({"amount": 100, "currency": "usd", "destination": account.id})
    assert raised.value.code == "insufficient_capabilities_for_transfer"


def test_transfers_are_listed_by_group_and_can_be_reversed(stripe_fake):
    client = stripe_api.client()
    destination = onboarded_account(client, stripe_fake)
    mine = client.v1.transfers.create(
        {"amount": 700, "currency": "usd", "destination": destination, "transfer_group": "payout-9"}
    )
    client.v1.transfers.create({"amount": 300, "currency": "usd", "destination": destination, "transfer_group": "x"})

    assert [t.id for t in client.v1.transfers.list({"transfer_group": "payout-9"})] == [mine.id]

    reversal = client.v1.transfers.reversals.create(mine.id, {"amount": 200})
    assert reversal.id.startswith("trr_")
    assert client.v1.transfers.retrieve(mine.id).amount_reversed == 200


def test_onboarding_link_and_account_state(stripe_fake):
    client = stripe_api.client()
    account = client.v1.accounts.create({"type": "express", "email": "olivia@example.com"})
    link = client.v1.account_links.create(
        {"account": account.id, "type": "account_onboarding", "refresh_url": "http://r", "return_url": "http://b"}
    )
    assert account.id in link.url
    assert link.expires_at > link.created
    assert client.v1.accounts.retrieve(account.id).payouts_enabled is False

    stripe_fake.account_update(account.id, payouts_enabled=True, details_submitted=True)
    assert client.v1.accounts.retrieve(account.id).payouts_enabled is True


def test_a_refund_cannot_exceed_what_was_paid(stripe_fake):
    client = stripe_api.client()
    intent = topup_intent(client)
    stripe_fake.succeed_payment(intent.id)

    refund = client.v1.refunds.create({"payment_intent": intent.id, "amount": 2000})
    assert (refund.amount, refund.status) == (2000, "succeeded")
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.create({"payment_intent": intent.id, "amount": 501})


def test_a_second_meter_event_with_the_same_identifier_is_rejected(stripe_fake):
    meter_events = stripe_api.client().v1.billing.meter_events
    event = {"event_name": "gpu_seconds", "payload": {"stripe_customer_id": "cus_1", "value": "60"}, "identifier": "a1"}

    meter_events.create(event)
    with pytest.raises(stripe.InvalidRequestError) as raised:
        meter_events.create({**event, "payload": {"stripe_customer_id": "cus_1", "value": "61"}})
    assert raised.value.http_status == 400
    assert [e["payload"]["value"] for e in stripe_fake.meter_events] == ["60"]


def test_a_signed_event_is_accepted_by_the_sdk(stripe_fake):
    event = stripe_fake.event("account.updated", {"id": "acct_1", "object": "account"}, account="acct_1")
    payload = json.dumps(event).encode()

    constructed = stripe.Webhook.construct_event(payload, sign(payload, "whsec_test_current"), "whsec_test_current")

    assert constructed.id == event["id"]
    assert constructed.type == "account.updated"
    assert constructed.account == "acct_1"
    assert constructed.data.object.id == "acct_1"


def test_a_wrong_secret_or_stale_timestamp_is_rejected(stripe_fake):
    payload = json.dumps(stripe_fake.event("payment_intent.succeeded", {"id": "pi_1"})).encode()

    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, sign(payload, "whsec_other"), "whsec_test_current")
    stale = sign(payload, "whsec_test_current", timestamp=int(time.time()) - 301)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, stale, "whsec_test_current", tolerance=300)


def test_a_refusal_is_replayed_for_its_key_but_a_validation_error_is_not(stripe_fake):
    client = stripe_api.client()
    destination = onboarded_account(client, stripe_fake)
    stripe_fake.available = 100
    transfer = {"amount": 500, "currency": "usd", "destination": destination}

    with pytest.raises(stripe.InvalidRequestError):
        client.v1.transfers.create(transfer, {"idempotency_key": "payout-1"})
    stripe_fake.available = 1000
    with pytest.raises(stripe.InvalidRequestError) as replayed:
        client.v1.transfers.create(transfer, {"idempotency_key": "payout-1"})
    assert replayed.value.code == "balance_insufficient"
    assert client.v1.transfers.create(transfer, {"idempotency_key": "payout-2"}).amount == 500

    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.create({"amount": 2500}, {"idempotency_key": "topup-9"})
    with pytest.raises(stripe.InvalidRequestError) as fixed:
        client.v1.payment_intents.create({"amount": 2500}, {"idempotency_key": "topup-9"})
    assert fixed.value.code == "parameter_missing"


def test_lists_page_newest_first_and_filter_on_created(stripe_fake):
    client = stripe_api.client()
    stripe_fake.now = lambda: 1000
    old = client.v1.customers.create({"email": "old@example.com"})
    stripe_fake.now = lambda: 2000
    new = [client.v1.customers.create({"email": f"c{i}@example.com"}).id for i in range(3)]

    listed = client.v1.customers.list({"limit": 2, "created": {"gte": 1500}})
    assert listed.has_more is True
    assert [c.id for c in listed.auto_paging_iter()] == new[::-1]
    assert [c.id for c in client.v1.customers.list({"created": {"lt": 1500}})] == [old.id]
    assert [c.id for c in client.v1.customers.list({"email": "old@example.com"})] == [old.id]


def test_refunds_and_accounts_can_be_listed(stripe_fake):
    client = stripe_api.client()
    intent = topup_intent(client)
    stripe_fake.succeed_payment(intent.id)
    refund = client.v1.refunds.create({"payment_intent": intent.id, "metadata": {"outbox_id": "o-1"}})
    account = client.v1.accounts.create({"type": "express"})

    assert [r.metadata["outbox_id"] for r in client.v1.refunds.list({"payment_intent": intent.id})] == ["o-1"]
    assert refund.amount == 2500
    assert [a.id for a in client.v1.accounts.list()] == [account.id]


def test_connect_requests_carry_the_account_and_are_recorded(stripe_fake):
    customer = stripe_api.client(stripe_account="acct_123").v1.customers.create({"email": "x@example.com"})
    assert stripe_fake.calls[-1] == ("POST", "/v1/customers", {"email": "x@example.com"}, ANY)
    assert stripe_fake.calls[-1].idempotency_key
    assert stripe_fake.headers[-1]["stripe-account"] == "acct_123"
    assert stripe_fake.get("customer", customer.id)["email"] == "x@example.com"
