"""The owner portal's units: live status, the unit page, enrolment, maintenance, location and scoping."""

import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from marketplace.jobs.placement import job_place
from marketplace.jobs.services import allocation_finish
from marketplace.kernel.models import AuditEvent
from nodes.models import EnrolmentToken, Unit
from nodes.selectors import renter_alias
from nodes.services import (
    GpuReport,
    unit_enrol,
    unit_heartbeat,
    unit_location_verify,
    unit_register,
    units_mark_unresponsive,
)
from tests.conftest import gpus_make, job_make, unit_online, user_make

UNITS = "/portal/units/"
ROWS = "/portal/units/rows/"


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def url(unit, part: str = "") -> str:
    return f"/portal/units/{unit.pk}/{part}"


def stored(unit) -> Unit:
    return Unit.objects.get(pk=unit.pk)


def text(html: str) -> str:
    """The page's words without tags, whitespace collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


def row_of(page: str, unit) -> str:
    start = page.index(f'<tr id="unit-{unit.pk}">')
    return text(page[start : page.index("</tr>", start)])


def hot_heartbeat(unit, *, temperatures=(71, 64), power_w=600):
    """A heartbeat with telemetry for the GPUs ``unit_online`` reported."""
    gpus = [
        GpuReport(index=i, uuid=f"GPU-{unit.name}-{i}", model="H100", vram_mb=81920, temperature_c=t, power_w=power_w)
        for i, t in enumerate(temperatures)
    ]
    unit_heartbeat(unit=stored(unit), gpus=gpus)


@pytest.fixture
def garage(owner):
    unit, _ = unit_online(owner, name="Garage", gpus=2)
    hot_heartbeat(unit)
    return stored(unit)


class TestTheList:
    def test_each_row_shows_status_heartbeat_gpus_temperature_and_power(self, owner, renter, garage):
        unit_register(owner=owner, name="Attic", country="FR", subdivision="FR-IDF")
        job_place(job_id=job_make(renter).pk)

        page = logged_in(owner).get(UNITS).content.decode()

        assert row_of(page, garage) == "Garage Germany Online 0 s ago 1 / 1 71 °C 1.2 kW"
        attic = Unit.objects.get(name="Attic")
        assert row_of(page, attic) == "Attic France (FR-IDF) Pending never 0 / 0 — —"

    def test_the_page_polls_its_rows_every_five_seconds(self, owner, garage):
        page = logged_in(owner).get(UNITS).content.decode()

        assert f'<tbody id="unit-rows" hx-get="{ROWS}" hx-trigger="every 5s" hx-swap="outerHTML">' in page

    def test_the_rows_are_served_alone_and_keep_polling(self, owner, garage):
        Unit.objects.filter(pk=garage.pk).update(status=Unit.Status.SUSPECT)

        fragment = logged_in(owner).get(ROWS).content.decode()

        assert fragment.startswith('<tbody id="unit-rows" hx-get="/portal/units/rows/" hx-trigger="every 5s"')
        assert "<html" not in fragment
        assert "Garage Germany Suspect" in row_of(fragment, garage)

    def test_the_rows_never_show_another_owners_units(self, owner, stranger, garage):
        theirs, _ = unit_online(stranger, name="Neighbours shed", gpus=1)

        for path in (UNITS, ROWS):
            page = logged_in(owner).get(path).content.decode()
            assert "Garage" in page
            assert "Neighbours shed" not in page and str(theirs.pk) not in page

    def test_the_rows_need_a_login_and_tell_htmx_to_reload_when_the_session_ended(self, db):
        assert Client().get(ROWS)["Location"].startswith("/accounts/login/?next=")

        response = Client().get(ROWS, headers={"HX-Request": "true"})

        assert (response.status_code, response["HX-Refresh"]) == (401, "true")

    @pytest.mark.parametrize("path", [UNITS, ROWS])
    def test_the_query_count_does_not_grow_with_the_units(self, owner, renter, path, django_assert_num_queries):
        client = logged_in(owner)
        unit_online(owner, name="first", gpus=2)
        job_place(job_id=job_make(renter).pk)
        with django_assert_num_queries(3):  # session, user, units with their GPU figures
            one = client.get(path)
        for n in range(4):
            unit_online(owner, name=f"more-{n}", gpus=3)
        job_place(job_id=job_make(renter).pk)

        with django_assert_num_queries(3):
            many = client.get(path)

        assert one.content.count(b"<tr id=") == 1 and many.content.count(b"<tr id=") == 5


class TestTheUnitPage:
    def test_it_shows_the_gpus_and_their_slices_advertised_and_leased(self, owner, renter):
        unit, _ = unit_online(owner, name="Shared", gpus=1, slicing="shared", shared_fraction=2)
        job_place(job_id=job_make(renter, isolation="shared", gpu_milli=500).pk)

        page = logged_in(owner).get(url(unit)).content.decode()

        slices = text(page[page.index('<table id="slices">') : page.index("</table>", page.index('id="slices"'))])
        shares = re.findall(
            r"0 Shared, share (\d) 40 GB Shared \(time-sliced GPU, no memory isolation\) 1.00 USD (.+?)(?= 0 |$)",
            slices,
        )
        assert sorted(leased for _, leased in shares) == ["yes no", "yes yes"]
        assert sorted(share for share, _ in shares) == ["1", "2"]

    def test_what_runs_now_shows_the_renter_by_an_alias_only(self, owner, renter, garage):
        job = job_make(renter, name="llama-finetune", gpu_count=2)
        job_place(job_id=job.pk)

        page = logged_in(owner).get(url(garage)).content.decode()

        running = text(page[page.index('<table id="running">') : page.index("</table>", page.index('id="running"'))])
        alias = renter_alias(owner_id=owner.pk, renter_id=renter.pk)
        assert re.fullmatch(r"renter [0-9a-f]{6}", alias)
        assert f"llama-finetune {alias} 0, 1" in running
        assert renter.username not in page

    def test_a_service_shows_its_ports_and_what_it_served_but_not_whom(self, owner, renter, garage):
        from django.utils import timezone

        from marketplace.jobs.models import ServiceTraffic

        job = job_make(renter, name="llm-api", workload_class="service", ports=[{"port": 8000}, {"port": 22}])
        job_place(job_id=job.pk)
        ServiceTraffic.objects.create(job=job, day=timezone.now().date(), port=8000, requests=9, bytes_in=1000,
                                      bytes_out=2_000_000)  # fmt: skip

        page = logged_in(owner).get(url(garage)).content.decode()

        running = text(page[page.index('<table id="running">') : page.index("</table>", page.index('id="running"'))])
        assert "ports 8000, 22: 1.9 MB through the relay" in running.replace("\xa0", " ")
        assert renter.username not in page

    def test_reliability_says_no_history_yet_until_a_job_has_ended(self, owner, renter, garage):
        assert "no history yet" in text(logged_in(owner).get(url(garage)).content.decode())

        allocation = job_place(job_id=job_make(renter).pk)
        allocation_finish(allocation=allocation, exit_code=0, reason="")

        page = text(logged_in(owner).get(url(garage)).content.decode())
        assert "no history yet" not in page
        assert "67 out of 100: 1 job ended in the last 30 days" in page  # (1 + 1) / (1 + 2)

    def test_a_job_without_a_name_is_shown_by_its_short_id(self, owner, renter, garage):
        job = job_make(renter)
        job_place(job_id=job.pk)

        page = logged_in(owner).get(url(garage)).content.decode()

        assert f"<tr><td>{str(job.pk)[:8]}</td>" in page

    def test_the_alias_is_stable_for_one_owner_and_differs_between_owners(self, owner, stranger, renter):
        mine = renter_alias(owner_id=owner.pk, renter_id=renter.pk)

        assert mine == renter_alias(owner_id=owner.pk, renter_id=renter.pk)
        assert mine != renter_alias(owner_id=stranger.pk, renter_id=renter.pk)

    def test_it_says_why_capacity_is_reduced_in_words(self, owner, garage):
        hot_heartbeat(garage, temperatures=(84, 60))
        Unit.objects.filter(pk=garage.pk).update(
            limits={"in_force": ["thermal", "quiet_hours", "power_budget"], "advertised_gpus": 0, "gpus": 2},
            quiet_hours_start="22:00", quiet_hours_end="07:00", quiet_hours_max_gpus=1, time_zone="Europe/Berlin",
            power_budget_kw="3.0",
        )  # fmt: skip

        status = text(logged_in(owner).get(url(garage, "status/")).content.decode())

        assert "Capacity is reduced now : 0 of 2 GPUs offered." in status
        assert "Temperature 84 °C ≥ 83 °C stop threshold: no new work until it is at or below 75 °C" in status
        assert "Quiet hours 22:00–07:00 (Europe/Berlin): at most 1 GPU takes new work" in status
        assert "Power budget 3.00 kW" in status

    @pytest.mark.parametrize(
        "limits", [{"in_force": 5}, [1], "thermal", {"in_force": ["thermal"], "gpus": "2", "advertised_gpus": {}}]
    )
    def test_limits_stored_in_a_bad_shape_do_not_break_the_page(self, owner, garage, limits):
        Unit.objects.filter(pk=garage.pk).update(limits=limits)

        page = logged_in(owner).get(url(garage))
        status = text(logged_in(owner).get(url(garage, "status/")).content.decode())

        assert page.status_code == 200
        assert "Capacity is reduced now" in status or "No limit reduces capacity now." in status

    def test_without_limits_it_says_none_reduces_capacity(self, owner, garage):
        status = text(logged_in(owner).get(url(garage, "status/")).content.decode())

        assert "Status Online" in status and "GPUs 0 busy, 2 free, of 2" in status
        assert "Hottest GPU 71 °C Power draw 1.2 kW" in status
        assert "No limit reduces capacity now." in status

    def test_the_status_block_polls_itself(self, owner, garage):
        page = logged_in(owner).get(url(garage)).content.decode()
        fragment = logged_in(owner).get(url(garage, "status/")).content.decode()

        poll = f'<div id="unit-status" hx-get="{url(garage, "status/")}" hx-trigger="every 5s" hx-swap="outerHTML">'
        assert poll in page and fragment.startswith(poll)
        assert "<html" not in fragment


class TestEnrolment:
    def test_the_register_form_has_a_labelled_country_picker_and_an_optional_subdivision(self, owner):
        page = logged_in(owner).get("/portal/units/new/").content.decode()

        assert '<label for="id_country">Country:</label>' in page
        assert '<option value="" selected>Choose a country…</option>' in page
        assert '<option value="DE">Germany</option>' in page and '<option value="NZ">New Zealand</option>' in page
        assert '<label for="id_subdivision">Subdivision (optional):</label>' in page
        assert '<label for="id_name">Name:</label>' in page
        assert "Register and get an enrolment token" in page

    def test_after_registering_the_page_waits_for_the_agent(self, owner):
        response = logged_in(owner).post("/portal/units/new/", {"name": "Garden shed", "country": "DE"})

        page = response.content.decode()
        assert response.status_code == 201
        assert "it is shown only this once" in page
        assert "Waiting for the agent to enrol…" in page
        unit = Unit.objects.get(owner=owner)
        assert re.search(rf'hx-get="{url(unit, "enrolment/")}\?since=[^"]+" hx-trigger="every 5s"', page)

    def test_the_pages_that_show_a_token_may_not_be_stored(self, owner, garage):
        """The token is shown once; no browser cache, proxy or back button may keep a copy."""
        client = logged_in(owner)
        registered = client.post("/portal/units/new/", {"name": "Garden shed", "country": "DE"})
        reissued = client.post(url(garage, "token/"))

        for response in (registered, reissued):
            assert "shs_enrol_" in response.content.decode() or "enrol --url" in response.content.decode()
            assert "no-store" in response["Cache-Control"]
        assert "no-store" not in client.get(url(garage)).get("Cache-Control", "")

    def test_the_enrolment_status_follows_the_agent_and_stops_polling_once_online(self, owner):
        unit, token = unit_register(owner=owner, name="Garden shed", country="DE")
        client = logged_in(owner)
        since = timezone.now().isoformat()

        def status() -> str:
            return client.get(url(unit, "enrolment/"), {"since": since}).content.decode()

        assert "Waiting for the agent to enrol…" in status() and "hx-get" in status()
        unit_enrol(token=token, hostname="shed.local", agent_version="test")
        assert "Enrolled — waiting for the first heartbeat" in status() and "hx-get" in status()
        unit_heartbeat(unit=stored(unit), gpus=[])
        assert "Enrolled — online" in status() and "hx-get" not in status()
        assert "Enrolled — online" in client.get(url(unit)).content.decode()  # a reload says the same

    def test_a_new_token_waits_for_its_own_enrolment_not_the_last_one(self, owner, garage):
        response = logged_in(owner).post(url(garage, "token/"))

        assert "Waiting for the agent to enrol…" in response.content.decode()
        since = re.search(r"\?since=([^\"]+)\"", response.content.decode()).group(1)
        again = logged_in(owner).get(f"{url(garage, 'enrolment/')}?since={since}").content.decode()
        assert "Waiting for the agent to enrol…" in again
        assert "Enrolled — online" in logged_in(owner).get(url(garage, "enrolment/")).content.decode()

    @pytest.mark.parametrize("since", ["2024-13-45T00:00:00+00:00", "yesterday", "2024-01-01T00:00:00"])
    def test_a_bad_since_means_any_enrolment(self, owner, garage, since):
        response = logged_in(owner).get(url(garage, "enrolment/"), {"since": since})

        assert response.status_code == 200
        assert "Enrolled — online" in response.content.decode()


class TestMaintenance:
    def test_draining_stops_new_work_and_resuming_takes_it_again(self, owner, renter, garage):
        running = job_place(job_id=job_make(renter).pk)
        version = garage.capacity_version

        response = logged_in(owner).post(url(garage, "drain/"))

        assert (response.status_code, response["Location"]) == (302, url(garage) + "#maintenance")
        assert stored(garage).status == Unit.Status.DRAINING
        assert stored(garage).capacity_version > version
        assert job_place(job_id=job_make(renter).pk) is None
        assert running.released_at is None
        page = logged_in(owner).get(url(garage)).content.decode()
        assert "Resume taking jobs" in page and "Draining for maintenance" in page

        logged_in(owner).post(url(garage, "resume/"))

        assert stored(garage).status == Unit.Status.ONLINE
        assert "Drain for maintenance" in logged_in(owner).get(url(garage)).content.decode()
        actions = AuditEvent.objects.filter(subject_id=garage.pk, action__startswith="unit.drain_")
        assert list(actions.values_list("action", "actor")) == [
            ("unit.drain_started", f"user:{owner.pk}"),
            ("unit.drain_ended", f"user:{owner.pk}"),
        ]

    def test_draining_twice_changes_nothing_the_second_time(self, owner, garage):
        logged_in(owner).post(url(garage, "drain/"))
        version = stored(garage).capacity_version

        logged_in(owner).post(url(garage, "drain/"))

        assert stored(garage).capacity_version == version
        assert AuditEvent.objects.filter(subject_id=garage.pk, action="unit.drain_started").count() == 1

    def test_a_unit_that_is_not_online_cannot_be_drained_and_the_page_says_why(self, owner):
        unit, _ = unit_register(owner=owner, name="Garden shed", country="DE")

        response = logged_in(owner).post(url(unit, "drain/"))

        assert response.status_code == 409
        assert "Only an online unit can be drained; this one is pending." in response.content.decode()
        assert stored(unit).status == Unit.Status.PENDING

    def test_a_drained_unit_that_misses_heartbeats_comes_back_draining(self, owner, garage):
        logged_in(owner).post(url(garage, "drain/"))
        later = timezone.now() + settings.UNIT_OFFLINE_AFTER + timedelta(seconds=1)
        units_mark_unresponsive(now=later)  # suspect
        units_mark_unresponsive(now=later)  # offline
        assert stored(garage).status == Unit.Status.OFFLINE

        unit_heartbeat(unit=stored(garage), gpus=gpus_make(2, prefix=f"GPU-{garage.name}"))

        assert (stored(garage).status, stored(garage).drain_requested) == (Unit.Status.DRAINING, True)
        logged_in(owner).post(url(garage, "resume/"))
        assert (stored(garage).status, stored(garage).drain_requested) == (Unit.Status.ONLINE, False)

    def test_a_heartbeat_loaded_before_a_drain_does_not_undo_it(self, owner, garage):
        loaded = stored(garage)  # a heartbeat request read the unit, then the owner drained it
        logged_in(owner).post(url(garage, "drain/"))

        unit_heartbeat(unit=loaded, gpus=gpus_make(2, prefix=f"GPU-{garage.name}"))

        assert stored(garage).status == Unit.Status.DRAINING

    def test_maintenance_takes_a_post(self, owner, garage):
        assert logged_in(owner).get(url(garage, "drain/")).status_code == 405
        assert logged_in(owner).get(url(garage, "resume/")).status_code == 405


class TestLocation:
    def observed(self, unit, country: str) -> Unit:
        Unit.objects.filter(pk=unit.pk).update(observed_country=country, observed_ip="203.0.113.9")
        unit = stored(unit)
        unit_location_verify(unit=unit)
        return unit

    def test_a_mismatch_is_explained_with_what_to_do(self, owner, garage):
        self.observed(garage, "FR")

        page = text(logged_in(owner).get(url(garage)).content.decode())

        assert "Declared Germany Agent's address in France (FR)" in page
        assert "State Mismatch — not verified" in page
        assert "You declared Germany, but the agent calls from an address in France." in page
        assert "If the unit really is in France, change the declared location below." in page

    def test_changing_the_declared_location_verifies_the_unit_again(self, owner, garage):
        self.observed(garage, "FR")

        response = logged_in(owner).post(url(garage, "location/"), {"country": "FR", "subdivision": "FR-IDF"})

        assert (response.status_code, response["Location"]) == (302, url(garage) + "#location")
        saved = stored(garage)
        assert (saved.country.code, saved.subdivision, saved.location_verified) == ("FR", "FR-IDF", True)
        assert AuditEvent.objects.filter(subject_id=garage.pk, action="unit.location_declared").exists()
        assert "State Verified" in text(logged_in(owner).get(url(garage)).content.decode())

    def test_a_bad_location_is_answered_next_to_the_field(self, owner, garage):
        response = logged_in(owner).post(url(garage, "location/"), {"country": "DE", "subdivision": "FR-IDF"})

        assert response.status_code == 200
        message = "The subdivision must belong to the country (DE-...)."
        assert f'<ul class="errorlist" id="id_subdivision_error"><li>{message}</li></ul>' in response.content.decode()
        assert stored(garage).subdivision == ""

    def test_without_evidence_the_page_says_how_to_get_verified(self, owner):
        unit, _ = unit_register(owner=owner, name="Garden shed", country="DE")

        page = text(logged_in(owner).get(url(unit)).content.decode())

        assert "State Not verified" in page
        assert "or when an operator attests the location after checking it" in page


class TestScoping:
    """Another owner's unit does not exist for you: every page, fragment and action is a 404."""

    READS = ["", "status/", "enrolment/"]
    WRITES = {
        "token/": {},
        "policy/": {"price_per_gpu_hour": "1"},
        "location/": {"country": "FR"},
        "drain/": {},
        "resume/": {},
    }

    @pytest.fixture
    def theirs(self, stranger):
        unit, _ = unit_online(stranger, name="Neighbours shed", gpus=1)
        return stored(unit)

    @pytest.mark.parametrize("part", READS)
    def test_reads(self, owner, theirs, part):
        response = logged_in(owner).get(url(theirs, part))

        assert response.status_code == 404
        assert b"Neighbours shed" not in response.content

    @pytest.mark.parametrize("part", list(WRITES))
    def test_writes(self, owner, theirs, part):
        tokens = EnrolmentToken.objects.filter(unit=theirs).count()

        response = logged_in(owner).post(url(theirs, part), self.WRITES[part])

        assert response.status_code == 404
        after = stored(theirs)
        assert (after.status, after.country.code, after.capacity_version) == (
            theirs.status,
            theirs.country.code,
            theirs.capacity_version,
        )
        assert EnrolmentToken.objects.filter(unit=theirs).count() == tokens

    @pytest.mark.parametrize("part", [*READS, *WRITES])
    def test_every_part_needs_a_login(self, theirs, part):
        client = Client()
        response = client.get(url(theirs, part)) if part in self.READS else client.post(url(theirs, part))

        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")

    def test_staff_see_any_unit_through_the_one_scoping_rule(self, theirs):
        operator = user_make("otto-operator", is_staff=True)

        assert logged_in(operator).get(url(theirs)).status_code == 200
