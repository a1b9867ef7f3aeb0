"""Operators' tools for the Stripe side (billing/admin.py and the runbook commands): the outbox,
webhook events, top-ups and billing profiles, each changed only through a service that records
who did it, and only by staff holding the change permission."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from billing.models import BillingProfile, OutboxMessage, TopUp, WebhookEvent
from billing.outbox import outbox_cancel, outbox_enqueue, outbox_retry, outbox_send
from billing.payouts import payout_failures_reverse, payouts_run
from billing.selectors import owner_payable_micros, wallet_balance_micros
from billing.topups import topup_create
from billing.webhooks import webhook_process, webhook_subject
from marketplace.kernel.errors import StateConflict
from marketplace.kernel.models import AuditEvent
from tests.billing.test_payouts import NOW, OLD, earned, onboarded, transfer_of
from tests.conftest import admin_action, command, user_make

pytestmark = pytest.mark.django_db


@pytest.fixture
def clerk(db):
    """Staff who may look at the billing rows but change nothing."""
    user = user_make("clara-clerk", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="billing", codename__startswith="view_")
    )
    return user


def customer_row(user, *, state=OutboxMessage.State.FAILED) -> OutboxMessage:
    BillingProfile.objects.get_or_create(user=user)
    message = outbox_enqueue(operation="customers.create", payload={"email": "rita@example.com"}, user=user)
    OutboxMessage.objects.filter(pk=message.pk).update(
        state=state,
        attempts=3,
        last_error="InvalidRequestError: a test",
        next_attempt_at=timezone.now() + timedelta(hours=1),
    )
    return OutboxMessage.objects.get(pk=message.pk)


def audit_actors(action: str) -> list[str]:
    return list(AuditEvent.objects.filter(action=action).values_list("actor", flat=True))


class TestOutboxRetry:
    def test_the_operator_retries_a_failed_row_and_it_is_sent_with_its_own_key(
        self, operator, renter, stripe_fake, django_capture_on_commit_callbacks
    ):
        message = customer_row(renter)

        with django_capture_on_commit_callbacks() as scheduled:
            notes = admin_action(operator, "retry_now", [message])

        assert notes == [f"{message}: queued to send now."]  # the row as it was
        message.refresh_from_db()
        assert message.state == OutboxMessage.State.PENDING and message.next_attempt_at <= timezone.now()
        assert len(scheduled) == 1  # the send, once the retry commits
        assert audit_actors("outbox.retried") == [f"user:{operator.pk}"]
        sent = outbox_send(message.pk)
        assert sent.state == OutboxMessage.State.SENT
        assert stripe_fake.calls[-1].idempotency_key == message.idempotency_key

    def test_a_row_stripe_refused_is_sent_with_a_fresh_key_as_stripe_replays_a_refusal_for_a_day(
        self, renter, stripe_fake
    ):
        message = customer_row(renter)

        retried = outbox_retry(message_id=message.pk, actor="user:1")

        assert retried.idempotency_key == f"shedshare-outbox-{message.pk}-resend-1"

    def test_a_row_failed_for_an_idempotency_conflict_keeps_its_key(self, renter, stripe_fake):
        message = customer_row(renter)
        OutboxMessage.objects.filter(pk=message.pk).update(last_error="IdempotencyError: keys for idempotent requests")

        retried = outbox_retry(message_id=message.pk, actor="user:1")

        assert retried.idempotency_key == f"shedshare-outbox-{message.pk}"

    def test_staff_without_the_change_permission_cannot_retry(self, clerk, renter, plain_static):
        message = customer_row(renter)

        admin_action(clerk, "retry_now", [message])

        assert OutboxMessage.objects.get(pk=message.pk).state == OutboxMessage.State.FAILED
        assert audit_actors("outbox.retried") == []

    def test_a_sent_row_is_not_sent_again(self, operator, renter, stripe_fake):
        message = outbox_send(customer_row(renter, state=OutboxMessage.State.PENDING).pk)

        notes = admin_action(operator, "retry_now", [message])

        assert notes == [f"{message}: The message is sent: there is nothing to send again."]

    def test_a_refused_payout_reversed_since_is_never_sent_again(self, owner, renter, stripe_fake):
        onboarded(owner, stripe_fake)
        earned(owner, renter, 50_000_000, at=OLD, key="e1")
        stripe_fake.available = 100
        [payout] = payouts_run(now=NOW)
        message = transfer_of(payout)
        payout_failures_reverse()  # the owner is owed it again; the next payout pays it
        stripe_fake.available = 10**9

        with pytest.raises(StateConflict, match="reversed"):
            outbox_retry(message_id=message.pk, actor="user:1")

        assert stripe_fake.objects("transfer") == []
        assert owner_payable_micros(owner) == 50_000_000

    def test_a_refused_payout_sent_again_is_no_longer_reversed(self, owner, renter, stripe_fake):
        onboarded(owner, stripe_fake)
        earned(owner, renter, 50_000_000, at=OLD, key="e1")
        stripe_fake.available = 100
        [payout] = payouts_run(now=NOW)
        message = transfer_of(payout)
        stripe_fake.available = 10**9

        outbox_retry(message_id=message.pk, actor="user:1")
        assert outbox_send(message.pk).state == OutboxMessage.State.SENT
        payout_failures_reverse()

        assert len(stripe_fake.objects("transfer")) == 1
        assert owner_payable_micros(owner) == 5_000_000  # the reserve: paid once, not owed again


class TestOutboxCancel:
    def test_the_operator_cancels_an_unsent_customer(self, operator, renter):
        message = customer_row(renter, state=OutboxMessage.State.PENDING)

        notes = admin_action(operator, "cancel", [message])

        assert notes == [f"{message}: cancelled."]
        assert OutboxMessage.objects.get(pk=message.pk).state == OutboxMessage.State.CANCELLED
        assert audit_actors("outbox.cancelled") == [f"user:{operator.pk}"]

    def test_a_cancelled_payment_intent_fails_its_top_up(self, renter, stripe_fake):
        stripe_fake.fail_next("/v1/payment_intents", "server_error")
        topup = topup_create(renter=renter, amount_minor=2500)
        assert topup.state == TopUp.State.CREATED

        outbox_cancel(message_id=topup.outbox_id, actor="user:1")

        assert TopUp.objects.get(pk=topup.pk).state == TopUp.State.FAILED
        assert outbox_send(topup.outbox_id).state == OutboxMessage.State.CANCELLED  # never sent after
        assert stripe_fake.objects("payment_intent") == []

    @pytest.mark.parametrize(
        "operation, payload",
        [
            ("transfers.create", {"amount": 100, "currency": "usd", "destination": "acct_1"}),
            ("transfers.create_reversal", {"transfer": "tr_1", "amount": 100}),
            ("refunds.create", {"payment_intent": "pi_1"}),
            ("billing.meter_events.create", {"event_name": "gpu_usage", "payload": {"value": "5"}}),
        ],
    )
    def test_rows_that_move_money_or_bill_usage_are_never_cancelled(self, operator, renter, operation, payload):
        message = outbox_enqueue(operation=operation, payload=payload, user=renter)

        [note] = admin_action(operator, "cancel", [message])

        assert f"A {operation} row is never cancelled" in note
        assert OutboxMessage.objects.get(pk=message.pk).state == OutboxMessage.State.PENDING
        assert audit_actors("outbox.cancelled") == []

    def test_staff_without_the_change_permission_cannot_cancel(self, clerk, renter, plain_static):
        message = customer_row(renter, state=OutboxMessage.State.PENDING)

        admin_action(clerk, "cancel", [message])

        assert OutboxMessage.objects.get(pk=message.pk).state == OutboxMessage.State.PENDING


@pytest.fixture
def needs_person(renter, stripe_fake, monkeypatch):
    """A paid top-up whose success event could not be processed (Stripe down) and was given up on."""
    monkeypatch.setattr("billing.webhooks.WEBHOOK_MAX_ATTEMPTS", 1)
    topup = topup_create(renter=renter, amount_minor=2500)
    payload = stripe_fake.event("payment_intent.succeeded", stripe_fake.succeed_payment(topup.payment_intent_id))
    event = WebhookEvent.objects.create(event_id=payload["id"], type=payload["type"], payload=payload)
    stripe_fake.fail_next("/v1/payment_intents", "server_error")
    assert webhook_process(event_id=event.event_id)
    event.refresh_from_db()
    assert event.failed_at is not None
    return event


class TestWebhookReplay:
    def test_the_operator_replays_an_event_that_needs_a_person_and_the_wallet_is_credited_once(
        self, operator, renter, needs_person
    ):
        notes = admin_action(operator, "replay", [needs_person])
        again = admin_action(operator, "replay", [needs_person])

        assert notes == again == [f"{needs_person}: processed."]
        assert wallet_balance_micros(renter) == 2500 * 10_000
        assert TopUp.objects.get(renter=renter).state == TopUp.State.SUCCEEDED
        replays = AuditEvent.objects.filter(action="webhook.replayed").order_by("id")
        assert [(e.subject_id, e.actor, e.data["was"]) for e in replays] == [
            (webhook_subject(needs_person.event_id), f"user:{operator.pk}", "needed a person"),
            (webhook_subject(needs_person.event_id), f"user:{operator.pk}", "processed"),
        ]

    def test_the_events_that_need_a_person_have_a_filter(self, operator, needs_person, plain_static):
        WebhookEvent.objects.create(
            event_id="evt_fine", type="account.updated", payload={}, processed_at=timezone.now()
        )
        client = Client()
        client.force_login(operator)

        page = client.get("/admin/billing/webhookevent/?status=person").content.decode()

        assert needs_person.event_id in page and "evt_fine" not in page
        assert "needs a person" in page

    def test_staff_without_the_change_permission_cannot_replay(self, clerk, renter, needs_person, plain_static):
        admin_action(clerk, "replay", [needs_person])

        assert wallet_balance_micros(renter) == 0

    def test_the_command_replays_by_id_and_every_event_that_needs_a_person(self, renter, needs_person):
        code, out = command("webhook_replay", "--needs-person")
        assert (code, out.strip()) == (0, f"{needs_person.event_id} payment_intent.succeeded: processed")

        assert command("webhook_replay", needs_person.event_id)[0] == 0  # processed before: nothing twice
        assert wallet_balance_micros(renter) == 2500 * 10_000
        assert command("webhook_replay", "--needs-person") == (0, "No event needs a person.\n")

    def test_the_command_fails_readably_while_the_event_still_fails(self, needs_person, stripe_fake):
        stripe_fake.fail_next("/v1/payment_intents", "server_error")

        code, out = command("webhook_replay", needs_person.event_id)

        assert code == 1
        assert "needs a person" in out and "1 of 1 event(s) not processed." in out

    @pytest.mark.parametrize(
        "args, error",
        [
            (["evt_nope"], "No stored event has the id evt_nope."),
            ([], "Name the events to replay, or give --needs-person (not both)."),
        ],
    )
    def test_the_command_refuses_bad_input(self, args, error):
        assert command("webhook_replay", *args) == (1, error)


class TestTopUpRefresh:
    def test_a_payment_whose_webhook_never_came_is_credited_once(self, operator, renter, stripe_fake):
        topup = topup_create(renter=renter, amount_minor=2500)
        stripe_fake.succeed_payment(topup.payment_intent_id)

        notes = admin_action(operator, "refresh_from_stripe", [topup])
        again = admin_action(operator, "refresh_from_stripe", [topup])

        assert notes == [f"{topup}: succeeded."]
        assert again == [
            f"{TopUp.objects.get(pk=topup.pk)}: The top-up was credited already: there is nothing to refresh."
        ]
        assert wallet_balance_micros(renter) == 2500 * 10_000
        assert audit_actors("topup.refreshed") == [f"user:{operator.pk}"]

    def test_a_declined_payment_fails_the_top_up(self, operator, renter, stripe_fake):
        topup = topup_create(renter=renter, amount_minor=2500)
        stripe_fake.fail_payment(topup.payment_intent_id)

        admin_action(operator, "refresh_from_stripe", [topup])

        assert TopUp.objects.get(pk=topup.pk).state == TopUp.State.FAILED

    def test_a_payment_intent_stripe_never_made_is_sent_again(self, operator, renter, stripe_fake):
        stripe_fake.fail_next("/v1/payment_intents", "server_error")
        topup = topup_create(renter=renter, amount_minor=2500)
        OutboxMessage.objects.filter(pk=topup.outbox_id).update(next_attempt_at=timezone.now() + timedelta(hours=1))

        admin_action(operator, "refresh_from_stripe", [topup])

        topup.refresh_from_db()
        assert topup.state == TopUp.State.AWAITING_PAYMENT and topup.payment_intent_id

    def test_stripe_down_is_reported_not_raised(self, operator, renter, stripe_fake):
        topup = topup_create(renter=renter, amount_minor=2500)
        stripe_fake.fail_next("/v1/payment_intents", "server_error")

        [note] = admin_action(operator, "refresh_from_stripe", [topup])

        assert note.startswith(f"{topup}: ") and TopUp.objects.get(pk=topup.pk).state == TopUp.State.AWAITING_PAYMENT


class TestBillingProfileSync:
    def test_the_operator_syncs_a_connect_account_from_stripe(self, operator, owner, stripe_fake):
        account_id = onboarded(owner, stripe_fake)
        BillingProfile.objects.filter(user=owner).update(payouts_enabled=False)
        stripe_fake.account_update(account_id, requirements={"currently_due": ["external_account"]})

        notes = admin_action(operator, "sync_from_stripe", [owner.billing])

        profile = BillingProfile.objects.get(user=owner)
        assert notes == [f"{profile}: payouts enabled."]
        assert (profile.payouts_enabled, profile.requirements_due) == (True, ["external_account"])
        assert audit_actors("billing_profile.synced") == [f"user:{operator.pk}"]

    def test_a_profile_without_a_connect_account_is_refused(self, operator, renter):
        profile = BillingProfile.objects.create(user=renter)

        [note] = admin_action(operator, "sync_from_stripe", [profile])

        assert "no Connect account" in note


class TestOutboxRetryCommand:
    def test_a_failed_row_is_sent_and_stripe_s_answer_printed(self, renter, stripe_fake):
        message = customer_row(renter)

        code, out = command("outbox_retry", str(message.pk))

        customer = stripe_fake.objects("customer")[0]
        assert (code, out) == (0, f"{message.pk} customers.create: sent: {customer['id']}\n")
        assert audit_actors("outbox.retried")[0].startswith("operator:")

    def test_every_failed_row(self, renter, stranger, stripe_fake):
        customer_row(renter), customer_row(stranger)

        code, out = command("outbox_retry", "--failed")

        assert code == 0 and out.count(": sent: ") == 2
        assert command("outbox_retry", "--failed") == (0, "No outbox row has failed.\n")

    def test_a_row_stripe_still_refuses_exits_non_zero(self, renter, stripe_fake):
        message = customer_row(renter)
        stripe_fake.fail_next("/v1/customers", "server_error")

        code, out = command("outbox_retry", str(message.pk))

        assert code == 1 and "pending: APIError" in out and "1 of 1 row(s) not sent." in out

    @pytest.mark.parametrize(
        "args, error",
        [
            (["not-an-id"], "'not-an-id' is not an outbox row id."),
            (
                ["6f1d3c2e-5a4b-4e0f-9c1d-2b7a8e5f4c30"],
                "No outbox row has the id 6f1d3c2e-5a4b-4e0f-9c1d-2b7a8e5f4c30.",
            ),
            ([], "Name the rows to send again, or give --failed (not both)."),
        ],
    )
    def test_bad_input_is_refused(self, args, error):
        assert command("outbox_retry", *args) == (1, error)

    def test_a_sent_row_is_refused(self, renter, stripe_fake):
        message = outbox_send(customer_row(renter, state=OutboxMessage.State.PENDING).pk)

        code, out = command("outbox_retry", str(message.pk))

        assert code == 1 and "refused: The message is sent" in out


class TestReconcileCommand:
    def test_a_past_day_is_reconciled_from_its_start(self, stripe_fake):
        day = (timezone.now() - timedelta(days=3)).date()

        assert command("reconcile_stripe", "--date", day.isoformat()) == (0, f"No drift since {day} 00:00 UTC.\n")

    @pytest.mark.parametrize(
        "day, error",
        [
            ("yesterday", "--date takes a day as YYYY-MM-DD, not 'yesterday'."),
            ("2999-01-01", "--date 2999-01-01 is in the future."),
        ],
    )
    def test_a_bad_date_is_refused(self, day, error, stripe_fake):
        assert command("reconcile_stripe", "--date", day) == (1, error)

    def test_without_stripe_it_says_so(self, settings):
        settings.STRIPE_SECRET_KEY = ""

        code, out = command("reconcile_stripe")

        assert code == 1 and out.startswith("Stripe is not configured")


class TestPages:
    def test_each_list_and_row_reads_without_a_form_to_change_it(self, operator, renter, stripe_fake, plain_static):
        topup = topup_create(renter=renter, amount_minor=2500)
        client = Client()
        client.force_login(operator)
        rows = {
            "outboxmessage": topup.outbox_id,
            "topup": topup.pk,
            "billingprofile": renter.billing.pk,
            "webhookevent": WebhookEvent.objects.create(event_id="evt_1", type="account.updated", payload={}).pk,
        }
        for model, pk in rows.items():
            assert client.get(f"/admin/billing/{model}/").status_code == 200
            page = client.get(f"/admin/billing/{model}/{pk}/change/").content.decode()
            assert 'name="_save"' not in page

        assert (
            topup.client_secret
            and topup.client_secret not in client.get(f"/admin/billing/topup/{topup.pk}/change/").content.decode()
        )
