import pytest

from billing.models import BillingProfile, OutboxMessage, TopUp
from billing.outbox import outbox_send
from billing.selectors import wallet_balance_micros
from billing.topups import PaymentsUnavailable, TopUpAmountInvalid, topup_create, topup_credit, topup_fail
from marketplace.kernel.models import AuditEvent
from tests.conftest import problem_of

pytestmark = pytest.mark.django_db


class TestTopUpCreate:
    def test_makes_the_customer_and_a_payment_intent_without_crediting_the_wallet(self, renter, stripe_fake):
        topup = topup_create(renter=renter, amount_minor=2500)

        [customer] = stripe_fake.objects("customer")
        [intent] = stripe_fake.objects("payment_intent")
        assert BillingProfile.objects.get(user=renter).stripe_customer_id == customer["id"]
        assert topup.state == TopUp.State.AWAITING_PAYMENT
        assert (topup.payment_intent_id, topup.client_secret) == (intent["id"], intent["client_secret"])
        assert (intent["amount"], intent["currency"], intent["customer"]) == (2500, "usd", customer["id"])
        assert intent["automatic_payment_methods"] == {"enabled": True}
        assert intent["metadata"] == {
            "topup_id": str(topup.id),
            "renter_id": str(renter.pk),
            "outbox_id": str(topup.outbox_id),
        }
        assert wallet_balance_micros(renter) == 0

    def test_a_second_top_up_reuses_the_customer(self, renter, stripe_fake):
        topup_create(renter=renter, amount_minor=2500)
        topup_create(renter=renter, amount_minor=1000)
        assert len(stripe_fake.objects("customer")) == 1
        assert len(stripe_fake.objects("payment_intent")) == 2

    def test_while_stripe_is_down_the_top_up_waits_for_the_outbox(self, renter, stripe_fake):
        topup_create(renter=renter, amount_minor=2500)
        stripe_fake.fail_next("/v1/payment_intents", "server_error")

        topup = topup_create(renter=renter, amount_minor=1000)
        assert (topup.state, topup.client_secret) == (TopUp.State.CREATED, "")
        assert OutboxMessage.objects.get(pk=topup.outbox_id).attempts == 1

        outbox_send(topup.outbox_id)
        topup.refresh_from_db()
        assert topup.state == TopUp.State.AWAITING_PAYMENT
        assert topup.client_secret.startswith(topup.payment_intent_id)

    def test_without_a_customer_no_top_up_is_written(self, renter, stripe_fake):
        stripe_fake.fail_next("/v1/customers", "timeout_before_apply")
        with pytest.raises(PaymentsUnavailable):
            topup_create(renter=renter, amount_minor=2500)
        assert not TopUp.objects.exists()
        # The Customer is still on its way: the next try sends that row instead of a new one.
        topup_create(renter=renter, amount_minor=2500)
        assert OutboxMessage.objects.filter(operation="customers.create").count() == 1

    @pytest.mark.parametrize("amount", [0, -500, 499, 1_000_001, 25.0, "2500", True, None])
    def test_refuses_amounts_that_are_not_sane_whole_minor_units(self, renter, stripe_fake, amount):
        with pytest.raises(TopUpAmountInvalid) as raised:
            topup_create(renter=renter, amount_minor=amount)
        assert isinstance(raised.value, ValueError)
        assert not TopUp.objects.exists()
        assert stripe_fake.calls == []


class TestTopUpFail:
    def test_a_succeeded_top_up_never_goes_back_to_failed(self, renter, stripe_fake):
        topup = topup_create(renter=renter, amount_minor=2500)
        topup = topup_credit(topup=topup, payment_intent=stripe_fake.succeed_payment(topup.payment_intent_id))
        assert topup_fail(topup=topup, reason="card_declined").state == TopUp.State.SUCCEEDED
        assert not AuditEvent.objects.filter(action="topup.failed").exists()

    def test_an_awaiting_top_up_fails_once(self, renter, stripe_fake):
        topup = topup_create(renter=renter, amount_minor=2500)
        assert topup_fail(topup=topup, reason="canceled").state == TopUp.State.FAILED
        topup_fail(topup=topup, reason="canceled")
        assert AuditEvent.objects.filter(action="topup.failed", subject_id=topup.id).count() == 1


class TestTopUpApi:
    def test_creating_answers_with_the_client_secret(self, renter_api, renter, stripe_fake):
        response = renter_api.post("/api/v1/top-ups", {"amount": "25.00"}, format="json")
        assert response.status_code == 201, response.content
        body = response.json()
        topup = TopUp.objects.get(renter=renter)
        assert body["id"] == str(topup.id)
        assert body["state"] == "awaiting_payment"
        assert (body["amount"], body["currency"]) == ("25.00", "usd")
        assert body["client_secret"] == stripe_fake.objects("payment_intent")[0]["client_secret"]
        assert topup.amount_minor == 2500

    def test_answers_202_while_the_payment_intent_is_on_its_way(self, renter_api, renter, stripe_fake):
        topup_create(renter=renter, amount_minor=500)
        stripe_fake.fail_next("/v1/payment_intents", "rate_limit")
        response = renter_api.post("/api/v1/top-ups", {"amount": "10"}, format="json")
        assert response.status_code == 202, response.content
        assert (response.json()["state"], response.json()["client_secret"]) == ("created", "")

    def test_reading_a_top_up_is_scoped_to_its_renter(self, renter_api, stranger_api, renter, stripe_fake):
        topup = topup_create(renter=renter, amount_minor=2500)
        mine = renter_api.get(f"/api/v1/top-ups/{topup.id}")
        assert mine.status_code == 200
        assert mine.json()["id"] == str(topup.id)
        problem_of(stranger_api.get(f"/api/v1/top-ups/{topup.id}"), 404)

    @pytest.mark.parametrize("amount", ["abc", "25.001", None])
    def test_a_malformed_amount_is_a_validation_problem(self, renter_api, stripe_fake, amount):
        body = problem_of(renter_api.post("/api/v1/top-ups", {"amount": amount}, format="json"), 400)
        assert "amount" in body["errors"]
        assert not TopUp.objects.exists()

    @pytest.mark.parametrize("amount", ["0.10", "-5.00", "20000.00"])
    def test_an_amount_out_of_bounds_is_a_problem(self, renter_api, stripe_fake, amount):
        body = problem_of(renter_api.post("/api/v1/top-ups", {"amount": amount}, format="json"), 400)
        assert body["type"] == "/problems/top-up-amount-invalid"
        assert not TopUp.objects.exists()

    def test_without_stripe_configured_a_top_up_is_a_503_and_leaves_nothing(self, renter_api, settings):
        settings.STRIPE_SECRET_KEY = ""  # and no fake installed: a marketplace not set up for payments
        body = problem_of(renter_api.post("/api/v1/top-ups", {"amount": "25.00"}, format="json"), 503)
        assert body["type"] == "/problems/payments-unavailable"
        assert "no Stripe account" in body["detail"]
        assert not TopUp.objects.exists() and not OutboxMessage.objects.exists()

    def test_strangers_without_a_key_are_turned_away(self, client, stripe_fake):
        response = client.post("/api/v1/top-ups", {"amount": "25.00"}, content_type="application/json")
        assert response.status_code in (401, 403)
