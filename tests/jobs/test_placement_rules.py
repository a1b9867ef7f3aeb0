"""The matching rules alone: plain values in, a verdict out. No database (no ``db`` fixture):
a job, a unit's profile and its free slices are built here as the capacity view holds them."""

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

from marketplace.jobs import packing
from marketplace.jobs.placement import rules

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)  # a Wednesday, noon UTC
HOUR_MICROS = 2_000_000


def job(**changes):
    fields = dict(
        gpu_count=1, gpu_models=[], min_vram_gb=0, min_cuda="", gpu_milli=None, isolation="gpu",
        max_price_per_gpu_hour_micros=None, jurisdictions=[], require_verified_location=False,
        workload_class="batch", max_duration_s=3600, rank="cheapest", interruptible=False, renter_id=7,
    )  # fmt: skip
    return SimpleNamespace(**{**fields, **changes})


def profile(**changes) -> rules.Profile:
    fields = dict(
        status="online", country="DE", subdivision="DE-BY", verified=True, subdivision_attested=False, disputed=False,
        isolation_levels=("gpu", "mig", "shared"), workload_classes=("batch", "interactive"),
        renters_accepted="anyone", interruptible_price_percent=40, max_job_duration_s=None, availability=(),
        time_zone="Europe/Berlin", reliability=0.9,
    )  # fmt: skip
    return rules.Profile(**{**fields, **changes})


def shape(**changes) -> rules.SliceShape:
    fields = dict(model="H100", vram_mb=81_920, cuda=(12, 8), kind="whole", isolation="gpu", price=HOUR_MICROS)
    return rules.SliceShape(**{**fields, "milli": packing.MILLI, **changes})


def unit(gpus: int = 2, **changes) -> rules.UnitState:
    free = {uuid.uuid4(): [(uuid.uuid4(), shape(**changes))] for _ in range(gpus)}
    return rules.UnitState(id=uuid.uuid4(), version=1, profile=profile(), free=free, busy=False, exclusive=False)


class Run:
    """What a pass knows beyond the view; here, which renters are verified."""

    def __init__(self, verified=()):
        self.now, self.verified = NOW, set(verified)

    def renter_verified(self, renter_id) -> bool:
        return renter_id in self.verified


class TestProfile:
    def test_a_unit_that_suits_the_job_is_not_ruled_out(self):
        assert rules.profile_rejection(job(), profile(), Run()) is None

    def test_offline_suspect_and_draining_units_are_ruled_out(self):
        assert rules.profile_rejection(job(), profile(status="offline"), Run()) == "unit_offline"
        assert rules.profile_rejection(job(), profile(status="suspect"), Run()) == "unit_offline"
        assert rules.profile_rejection(job(), profile(status="draining"), Run()) == "unit_draining"

    def test_a_unit_under_review_takes_no_job(self):
        assert rules.profile_rejection(job(), profile(under_review=True), Run()) == "unit_under_review"

    def test_an_agent_configured_for_another_country_keeps_residency_restricted_jobs_away(self):
        elsewhere = profile(agent_country="FR")
        assert rules.profile_rejection(job(jurisdictions=["DE"]), elsewhere, Run()) == "agent_country"
        assert rules.profile_rejection(job(jurisdictions=["EU"]), elsewhere, Run()) == "agent_country"
        assert rules.profile_rejection(job(), elsewhere, Run()) is None  # anywhere will do
        assert rules.profile_rejection(job(jurisdictions=["DE"]), profile(agent_country="DE"), Run()) is None
        assert rules.profile_rejection(job(jurisdictions=["DE"]), profile(agent_country=""), Run()) is None

    def test_jurisdictions_admit_the_country_its_subdivisions_and_named_sets(self):
        assert rules.profile_rejection(job(jurisdictions=["DE"]), profile(), Run()) is None
        assert rules.profile_rejection(job(jurisdictions=["DE-BY"]), profile(), Run()) is None
        assert rules.profile_rejection(job(jurisdictions=["EU"]), profile(), Run()) is None
        assert rules.profile_rejection(job(jurisdictions=["FR"]), profile(), Run()) == "jurisdiction"
        assert rules.profile_rejection(job(jurisdictions=["DE-BE"]), profile(), Run()) == "jurisdiction"

    def test_a_verified_location_is_needed_when_asked_for(self):
        strict = job(jurisdictions=["DE"], require_verified_location=True)
        assert rules.profile_rejection(strict, profile(verified=False), Run()) == "location_unverified"
        assert rules.profile_rejection(strict, profile(), Run()) is None

    def test_a_subdivision_alone_needs_an_attestation_not_only_address_evidence(self):
        by_state = job(jurisdictions=["DE-BY"], require_verified_location=True)
        assert rules.profile_rejection(by_state, profile(), Run()) == "location_unverified"
        assert rules.profile_rejection(by_state, profile(subdivision_attested=True), Run()) is None
        also_country = job(jurisdictions=["DE-BY", "DE"], require_verified_location=True)
        assert rules.profile_rejection(also_country, profile(), Run()) is None

    def test_isolation_above_what_the_owner_offers_is_ruled_out(self):
        assert rules.profile_rejection(job(isolation="node"), profile(), Run()) == "isolation"
        assert rules.profile_rejection(job(isolation="gpu"), profile(isolation_levels=()), Run()) == "isolation"
        assert rules.profile_rejection(job(isolation="shared"), profile(isolation_levels=("shared",)), Run()) is None

    def test_the_owners_workload_classes_duration_and_renters_hold(self):
        assert rules.profile_rejection(job(workload_class="service"), profile(), Run()) == "workload_class"
        assert rules.profile_rejection(job(), profile(max_job_duration_s=60), Run()) == "max_duration"
        verified_only = profile(renters_accepted="verified")
        assert rules.profile_rejection(job(), verified_only, Run()) == "renter_unverified"
        assert rules.profile_rejection(job(), verified_only, Run(verified={7})) is None

    def test_a_job_that_would_run_past_the_availability_window_is_ruled_out(self):
        # Weekdays 08:00-13:00 Berlin time; it is 13:00 there, so nothing fits now.
        windows = ({"days": [0, 1, 2, 3, 4], "start": "08:00", "end": "13:00"},)
        closed = profile(availability=rules.availability.key(list(windows)))
        assert rules.profile_rejection(job(max_duration_s=600), closed, Run()) == "availability"


class TestSlices:
    def test_each_requirement_names_the_slice_rule_it_breaks(self):
        p = profile()
        assert rules.slice_rejection(job(), shape(), p) is None
        assert rules.slice_rejection(job(gpu_models=["L40S"]), shape(), p) == "gpu_model"
        assert rules.slice_rejection(job(min_vram_gb=96), shape(), p) == "vram"
        assert rules.slice_rejection(job(min_cuda="12.9"), shape(), p) == "cuda"
        assert rules.slice_rejection(job(min_cuda="12"), shape(), p) is None
        assert rules.slice_rejection(job(), shape(isolation="mig"), p) == "isolation"
        assert rules.slice_rejection(job(max_price_per_gpu_hour_micros=HOUR_MICROS - 1), shape(), p) == "price_cap"
        assert rules.slice_rejection(job(gpu_milli=500), shape(milli=250), p) == "gpu_share"

    def test_an_interruptible_job_pays_the_owners_interruptible_price_under_its_cap(self):
        cap = HOUR_MICROS // 2
        assert rules.charged(job(interruptible=True), profile(), HOUR_MICROS) == HOUR_MICROS * 40 // 100
        spot = job(interruptible=True, max_price_per_gpu_hour_micros=cap)
        assert rules.slice_rejection(spot, shape(), profile()) is None

    def test_cuda_versions_compare_as_numbers_and_stop_at_junk(self):
        assert rules.cuda_tuple("12.10") > rules.cuda_tuple("12.9")
        assert rules.cuda_tuple("12.x") == (12,)
        assert rules.cuda_tuple("") == ()


class TestChoose:
    def test_a_gang_takes_as_many_gpus_at_the_dearest_slice_price(self):
        state = unit(gpus=4)
        choice = rules.choose(job(gpu_count=3), state, lambda *_: None)
        assert len(choice.take) == 3
        assert choice.price == HOUR_MICROS
        assert len(set(rules.slices_for(state, choice))) == 3

    def test_too_few_fitting_gpus_says_why(self):
        assert rules.choose(job(gpu_count=3), unit(gpus=2), lambda *_: None) == "capacity"
        assert rules.choose(job(gpu_models=["L40S"]), unit(gpus=2), lambda *_: None) == "gpu_model"

    def test_a_node_job_needs_the_whole_idle_unit(self):
        state = unit(gpus=2)
        assert rules.choose(job(isolation="node", gpu_count=1), state, lambda *_: None).take == (
            (0, packing.MILLI),
            (1, packing.MILLI),
        )
        state.busy = True
        assert rules.choose(job(isolation="node"), state, lambda *_: None) == "unit_busy"

    def test_an_exclusive_unit_takes_nothing_else(self):
        state = unit(gpus=2)
        state.exclusive = True
        assert rules.choose(job(), state, lambda *_: None) == "unit_busy"

    def test_the_jobs_preference_orders_the_choices(self):
        state = unit(gpus=1)
        cheapest = rules.choose(job(), state, lambda *_: None)
        reliable = rules.choose(job(rank="reliable"), state, lambda *_: None)
        assert cheapest.rank[0] == HOUR_MICROS
        assert reliable.rank[0] == -0.9
