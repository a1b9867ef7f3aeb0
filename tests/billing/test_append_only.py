"""The ledger and the audit log are append-only in PostgreSQL itself, not only by convention."""

import uuid

import pytest
from django.db import DatabaseError, connection, transaction

from billing.models import Account, LedgerEntry, LedgerTransaction
from billing.services import wallet_credit_promotional
from marketplace.kernel.audit import audit_record
from marketplace.kernel.models import AuditEvent

pytestmark = [pytest.mark.pg, pytest.mark.django_db]


@pytest.fixture
def posting(renter):
    return wallet_credit_promotional(user=renter, amount_micros=5_000_000, key="promo:append-only")


def refused(sql: str, params: list) -> str:
    with pytest.raises(DatabaseError) as caught, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)
    return str(caught.value)


def test_a_ledger_entry_cannot_be_changed_or_deleted(posting):
    entry = posting.entries.first()
    assert "append-only: UPDATE refused" in refused(
        "UPDATE billing_ledgerentry SET amount_micros = 0 WHERE id = %s", [entry.pk]
    )
    assert "append-only: DELETE refused" in refused("DELETE FROM billing_ledgerentry WHERE id = %s", [entry.pk])
    with pytest.raises(DatabaseError), transaction.atomic():
        LedgerEntry.objects.filter(pk=entry.pk).update(amount_micros=1)
    assert LedgerEntry.objects.get(pk=entry.pk).amount_micros == entry.amount_micros


def test_a_ledger_transaction_cannot_be_changed_or_deleted(posting):
    assert "UPDATE refused" in refused("UPDATE billing_ledgertransaction SET memo = 'x' WHERE id = %s", [posting.pk])
    with pytest.raises(DatabaseError), transaction.atomic():
        LedgerTransaction.objects.filter(pk=posting.pk).delete()
    assert LedgerTransaction.objects.filter(pk=posting.pk).exists()


def test_an_audit_event_cannot_be_changed_or_deleted(db):
    event = audit_record("test.happened", uuid.uuid4(), actor="tests", detail="kept")
    assert "UPDATE refused" in refused("UPDATE kernel_auditevent SET action = 'x' WHERE id = %s", [event.pk])
    with pytest.raises(DatabaseError), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).delete()
    assert AuditEvent.objects.get(pk=event.pk).data == {"detail": "kept"}


def test_new_rows_are_still_appended(posting, renter):
    wallet = Account.objects.get(kind=Account.Kind.RENTER_WALLET, user=renter)
    wallet_credit_promotional(user=renter, amount_micros=1_000_000, key="promo:append-only-2")
    assert sum(wallet.entries.values_list("amount_micros", flat=True)) == 6_000_000
    assert AuditEvent.objects.filter(action="ledger.promotion_posted").count() == 2
