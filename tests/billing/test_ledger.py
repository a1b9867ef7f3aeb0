"""One posting path for single and bulk postings: balanced legs, written once, audited."""

import pytest

from billing.models import Account, LedgerEntry, LedgerTransaction
from billing.services import Posting, UnbalancedTransaction, account_for, ledger_post_many, usage_rate
from marketplace.jobs.usage import SampleReport, usage_record
from marketplace.kernel.models import AuditEvent
from tests.billing.test_metering import AT, allocation_make
from tests.conftest import unit_online


@pytest.fixture
def accounts(renter):
    return account_for(Account.Kind.RENTER_WALLET, renter), account_for(Account.Kind.PLATFORM_LOSSES)


def test_a_bulk_posting_with_one_unbalanced_transaction_writes_nothing(accounts):
    wallet, losses = accounts
    good = Posting("promo:a", "promotion", [(wallet, 100), (losses, -100)])
    bad = Posting("promo:b", "promotion", [(wallet, 100), (losses, -99)])

    with pytest.raises(UnbalancedTransaction, match="promo:b"):
        ledger_post_many([good, bad])

    assert not LedgerTransaction.objects.exists()
    assert not LedgerEntry.objects.exists()


def test_bulk_postings_write_their_entries_and_an_audit_row_each(accounts):
    wallet, losses = accounts
    postings = [Posting(f"promo:{n}", "promotion", [(wallet, n), (losses, -n)]) for n in (1, 2, 3)]

    txns = ledger_post_many(postings)

    assert [t.key for t in txns] == ["promo:1", "promo:2", "promo:3"]
    assert LedgerEntry.objects.filter(account=wallet).count() == 3
    audited = AuditEvent.objects.filter(action="ledger.promotion_posted")
    assert sorted(e.data["key"] for e in audited) == ["promo:1", "promo:2", "promo:3"]


def test_the_rating_sweep_posts_through_the_same_path_and_audits_each_job(owner, renter):
    unit, _ = unit_online(owner, name="rated", gpus=2)
    allocations = [allocation_make(renter, unit) for _ in range(2)]
    for allocation in allocations:
        usage_record(allocation=allocation, samples=[SampleReport(seq=1, gpu_ms=3_600_000, recorded_at=AT)])

    txns = usage_rate([a.pk for a in allocations])

    assert len(txns) == 2
    for txn in txns:
        assert sum(txn.entries.values_list("amount_micros", flat=True)) == 0
    subjects = set(AuditEvent.objects.filter(action="ledger.usage_posted").values_list("subject_id", flat=True))
    assert subjects == {a.job_id for a in allocations}
    assert usage_rate([a.pk for a in allocations]) == []  # nothing more is due: posted once
