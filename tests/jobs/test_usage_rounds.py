"""Usage reports taken together (``usage_record_many``, what the connection servers do with
the reports that arrive while a round is stored): each report is stored and answered exactly as
``usage_record`` would have, called for each in turn."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketplace.jobs.models import UsageSample
from marketplace.jobs.placement import job_place
from marketplace.jobs.usage import SampleReport, UsageRefused, UsageReport, usage_record, usage_record_many
from tests.conftest import allocation_since, job_make, unit_online


class Rollback(Exception):
    pass


@pytest.fixture
def two_sheds(owner, renter, settings):
    """Two units with a one-GPU allocation each, active for a minute: 90 s of GPU time allowed
    with the tolerance."""
    settings.USAGE_TOLERANCE_S = 30
    settings.USAGE_CLOCK_SKEW_S = 120
    allocations = []
    for name in ("a", "b"):
        unit, _ = unit_online(owner, name=name, gpus=1)
        allocation = job_place(job_id=job_make(renter).pk)
        assert allocation.unit_id == unit.pk
        allocations.append(allocation_since(allocation, timezone.now() - timedelta(minutes=1)))
    return allocations


def stored() -> set[tuple]:
    return set(UsageSample.objects.values_list("allocation_id", "seq", "gpu_ms"))


def one_by_one(reports: list[UsageReport], allocations) -> list:
    by_pk = {allocation.pk: allocation for allocation in allocations}
    answers = []
    for report in reports:
        allocation = by_pk[report.allocation_id]
        if allocation.unit_id != report.unit_id:
            answers.append(None)  # the API's 404: not this unit's allocation
            continue
        try:
            answers.append(usage_record(allocation=allocation, samples=report.samples))
        except UsageRefused:
            answers.append(None)
    return answers


def outcome(record) -> tuple[list, set]:
    """What ``record`` answers and stores, undone afterwards."""
    result = {}
    try:
        with transaction.atomic():
            result["answers"] = record()
            result["stored"] = stored()
            raise Rollback
    except Rollback:
        pass
    return result["answers"], result["stored"]


report_shapes = st.lists(
    st.tuples(
        st.sampled_from([0, 1]),  # which allocation
        st.booleans(),  # reported by the other unit
        st.lists(st.tuples(st.integers(1, 6), st.sampled_from([500, 5_000, 40_000])), min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=report_shapes)
def test_a_round_stores_and_answers_each_report_as_usage_record_would_in_turn(two_sheds, shapes):
    now = timezone.now()
    reports = []
    for which, by_other, samples in shapes:
        allocation, other = two_sheds[which], two_sheds[1 - which]
        reports.append(UsageReport(
            unit_id=(other if by_other else allocation).unit_id, allocation_id=allocation.pk,
            samples=[SampleReport(seq=seq, gpu_ms=gpu_ms, recorded_at=now) for seq, gpu_ms in samples],
        ))  # fmt: skip

    together = outcome(lambda: usage_record_many(reports))
    alone = outcome(lambda: one_by_one(reports, two_sheds))

    assert together == alone


def test_a_refused_or_foreign_report_is_left_for_its_own_call_and_the_others_are_stored(two_sheds):
    mine, theirs = two_sheds
    now = timezone.now()
    reports = [
        UsageReport(mine.unit_id, mine.pk, [SampleReport(seq=1, gpu_ms=1_000, recorded_at=now)]),
        UsageReport(mine.unit_id, theirs.pk, [SampleReport(seq=1, gpu_ms=1_000, recorded_at=now)]),
        UsageReport(theirs.unit_id, theirs.pk, [SampleReport(seq=1, gpu_ms=10 * 60_000, recorded_at=now)]),
        UsageReport(
            mine.unit_id,
            mine.pk,
            [SampleReport(seq=1, gpu_ms=1_000, recorded_at=now), SampleReport(seq=2, gpu_ms=2_000, recorded_at=now)],
        ),  # fmt: skip
    ]

    assert usage_record_many(reports) == [(1, 0), None, None, (1, 1)]
    assert stored() == {(mine.pk, 1, 1_000), (mine.pk, 2, 2_000)}
