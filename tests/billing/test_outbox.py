import logging
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from billing.models import BillingProfile, OutboxMessage
from billing.outbox import outbox_backoff, outbox_due, outbox_enqueue, outbox_send, outbox_sweep
from marketplace.kernel.models import AuditEvent

pytestmark = pytest.mark.django_db


def customer_row(user, **payload) -> OutboxMessage:
    BillingProfile.objects.get_or_create(user=user)
    return outbox_enqueue(operation="customers.create", payload={"email": "rita@example.com", **payload}, user=user)


def posts(fake, path: str) -> list:
    return [call for call in fake.calls if call.method == "POST" and call.path == path]


class TestEnqueue:
    def test_the_row_is_tagged_with_its_id_and_sent_once_the_transaction_commits(
        self, renter, django_capture_on_commit_callbacks
    ):
        with django_capture_on_commit_callbacks() as scheduled:
            message = customer_row(renter)
        assert message.state == OutboxMessage.State.PENDING
        assert message.payload["metadata"] == {"outbox_id": str(message.id)}
        assert message.idempotency_key == f"shedshare-outbox-{message.id}"
        assert len(scheduled) == 1

    def test_an_unknown_operation_is_refused(self, renter):
        with pytest.raises(ValueError, match="Unknown outbox operation"):
            outbox_enqueue(operation="charges.create", payload={}, user=renter)


class TestSend:
    def test_a_sent_row_records_the_object_and_runs_its_follow_up(self, renter, stripe_fake):
        message = outbox_send(customer_row(renter).id)
        customer = stripe_fake.objects("customer")[0]
        assert message.state == OutboxMessage.State.SENT
        assert message.stripe_id == customer["id"]
        assert message.result["id"] == customer["id"]
        assert message.sent_at is not None
        assert customer["metadata"]["outbox_id"] == str(message.id)
        assert posts(stripe_fake, "/v1/customers")[0].idempotency_key == message.idempotency_key
        assert BillingProfile.objects.get(user=renter).stripe_customer_id == customer["id"]

    def test_sending_again_changes_nothing(self, renter, stripe_fake):
        message = customer_row(renter)
        outbox_send(message.id)
        outbox_send(message.id)
        assert len(posts(stripe_fake, "/v1/customers")) == 1

    def test_a_request_that_timed_out_after_stripe_applied_it_is_adopted_on_retry(self, renter, stripe_fake):
        message = customer_row(renter)
        stripe_fake.fail_next("/v1/customers", "timeout_after_apply")

        message = outbox_send(message.id)
        assert message.state == OutboxMessage.State.PENDING
        assert message.attempts == 1
        assert "APIConnectionError" in message.last_error
        assert len(stripe_fake.objects("customer")) == 1

        message = outbox_send(message.id)
        assert message.state == OutboxMessage.State.SENT
        assert [c["id"] for c in stripe_fake.objects("customer")] == [message.stripe_id]

    def test_a_request_lost_before_it_arrived_is_sent_again(self, renter, stripe_fake):
        message = customer_row(renter)
        stripe_fake.fail_next("/v1/customers", "timeout_before_apply")
        assert outbox_send(message.id).state == OutboxMessage.State.PENDING
        assert stripe_fake.objects("customer") == []
        assert outbox_send(message.id).state == OutboxMessage.State.SENT
        assert len(stripe_fake.objects("customer")) == 1

    def test_a_reused_key_with_changed_parameters_fails_loudly_as_a_bug(self, renter, stripe_fake, caplog):
        message = customer_row(renter)
        stripe_fake.fail_next("/v1/customers", "timeout_after_apply")
        outbox_send(message.id)
        # A defect changes the frozen payload between two attempts.
        OutboxMessage.objects.filter(pk=message.pk).update(payload={**message.payload, "email": "other@example.com"})

        with caplog.at_level(logging.ERROR, logger="billing.outbox"):
            message = outbox_send(message.id)

        assert message.state == OutboxMessage.State.FAILED
        assert "IdempotencyError" in message.last_error
        assert any(r.levelno == logging.ERROR and "idempotency key reused" in r.message for r in caplog.records)
        audit = AuditEvent.objects.get(action="outbox.idempotency_conflict", subject_id=message.id)
        assert audit.data["operation"] == "customers.create"
        assert len(stripe_fake.objects("customer")) == 1
        assert message.pk not in outbox_due()

    def test_a_request_stripe_refuses_fails_and_is_audited(self, renter, stripe_fake):
        message = outbox_enqueue(
            operation="payment_intents.create", payload={"amount": 10, "currency": "usd"}, user=renter
        )
        message = outbox_send(message.id)
        assert message.state == OutboxMessage.State.FAILED
        assert "InvalidRequestError" in message.last_error
        assert AuditEvent.objects.filter(action="outbox.failed", subject_id=message.id).exists()

    @pytest.mark.parametrize("fault", ["rate_limit", "server_error"])
    def test_429_and_500_back_off_then_succeed(self, renter, stripe_fake, fault):
        message = customer_row(renter)
        stripe_fake.fail_next("/v1/customers", fault, times=2)
        before = timezone.now()

        message = outbox_send(message.id)
        assert (message.state, message.attempts) == (OutboxMessage.State.PENDING, 1)
        assert message.next_attempt_at > before
        assert message.pk not in outbox_due()

        message = outbox_send(message.id)
        assert message.attempts == 2
        assert stripe_fake.objects("customer") == []

        OutboxMessage.objects.filter(pk=message.pk).update(next_attempt_at=timezone.now())
        assert message.pk in outbox_due()
        message = outbox_send(message.id)
        assert (message.state, message.attempts) == (OutboxMessage.State.SENT, 3)
        assert len(stripe_fake.objects("customer")) == 1

    def test_a_rate_limit_waits_at_least_as_long_as_retry_after_says(self, renter, stripe_fake):
        message = customer_row(renter)
        stripe_fake.fail_next("/v1/customers", "rate_limit")
        before = timezone.now()
        message = outbox_send(message.id)
        assert message.next_attempt_at >= before + timedelta(seconds=1)  # the fake sends Retry-After: 1


class TestBackoff:
    def test_grows_exponentially_with_jitter_and_is_capped(self):
        assert timedelta(seconds=1) <= outbox_backoff(1) <= timedelta(seconds=2)
        assert timedelta(seconds=8) <= outbox_backoff(4) <= timedelta(seconds=16)
        assert timedelta(minutes=5) <= outbox_backoff(30) <= timedelta(minutes=10)
        assert len({outbox_backoff(6) for _ in range(20)}) > 1

    def test_honours_retry_after(self):
        assert outbox_backoff(1, retry_after_s=90) >= timedelta(seconds=90)


class TestOldRows:
    def test_a_row_older_than_the_lookup_threshold_is_looked_up_and_not_created_again(self, renter, stripe_fake):
        message = customer_row(renter)
        stripe_fake.fail_next("/v1/customers", "timeout_after_apply")
        outbox_send(message.id)
        # A day later Stripe has forgotten the key: only a look-up can tell the object exists.
        OutboxMessage.objects.filter(pk=message.pk).update(
            created_at=timezone.now() - settings.OUTBOX_LOOKUP_AFTER - timedelta(minutes=1)
        )

        message = outbox_send(message.id)

        assert message.state == OutboxMessage.State.SENT
        assert len(posts(stripe_fake, "/v1/customers")) == 1
        assert [c["id"] for c in stripe_fake.objects("customer")] == [message.stripe_id]
        assert BillingProfile.objects.get(user=renter).stripe_customer_id == message.stripe_id

    def test_an_old_row_stripe_never_saw_is_sent(self, renter, stripe_fake):
        message = customer_row(renter)
        OutboxMessage.objects.filter(pk=message.pk).update(
            created_at=timezone.now() - settings.OUTBOX_LOOKUP_AFTER - timedelta(minutes=1)
        )
        message = outbox_send(message.id)
        assert message.state == OutboxMessage.State.SENT
        assert len(posts(stripe_fake, "/v1/customers")) == 1


class TestMeterEvents:
    def test_carry_an_identifier_and_a_duplicate_identifier_counts_as_sent(self, renter, stripe_fake):
        payload = {"event_name": "gpu_seconds", "identifier": "usage-rita-2026010112", "payload": {"value": "5"}}
        first = outbox_send(outbox_enqueue(operation="billing.meter_events.create", payload=payload, user=renter).id)
        second = outbox_send(outbox_enqueue(operation="billing.meter_events.create", payload=payload, user=renter).id)
        assert "metadata" not in first.payload
        assert (first.state, second.state) == (OutboxMessage.State.SENT, OutboxMessage.State.SENT)
        assert len(stripe_fake.meter_events) == 1


class TestSweep:
    def test_sends_due_rows_oldest_first_in_bounded_numbers(self, renter, stranger, stripe_fake):
        oldest, newer = customer_row(renter), customer_row(stranger)
        later = customer_row(renter)
        OutboxMessage.objects.filter(pk=oldest.pk).update(created_at=timezone.now() - timedelta(minutes=2))
        OutboxMessage.objects.filter(pk=later.pk).update(next_attempt_at=timezone.now() + timedelta(minutes=5))

        assert outbox_sweep(limit=1) == 1
        assert OutboxMessage.objects.get(pk=oldest.pk).state == OutboxMessage.State.SENT
        assert OutboxMessage.objects.get(pk=newer.pk).state == OutboxMessage.State.PENDING

        assert outbox_sweep() == 1
        assert OutboxMessage.objects.get(pk=newer.pk).state == OutboxMessage.State.SENT
        assert OutboxMessage.objects.get(pk=later.pk).state == OutboxMessage.State.PENDING

    def test_the_beat_runs_the_sweep_every_thirty_seconds(self):
        entry = next(e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"] == "billing.tasks.outbox_sweep")
        assert entry["schedule"] == 30.0


class TestTasks:
    def test_the_send_task_and_the_sweep_task_send_pending_rows(self, renter, stranger, stripe_fake):
        from billing import tasks

        first, second = customer_row(renter), customer_row(stranger)
        tasks.outbox_send(str(first.id))
        assert OutboxMessage.objects.get(pk=first.pk).state == OutboxMessage.State.SENT
        tasks.outbox_sweep()
        assert OutboxMessage.objects.get(pk=second.pk).state == OutboxMessage.State.SENT
