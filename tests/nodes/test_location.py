"""A unit's location: declared by its owner, verified by its agent's address or an operator's
attestation, unverified at once by a mismatch."""

import socket
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

from marketplace.jobs.models import Job
from marketplace.jobs.placement import job_place
from marketplace.kernel.models import AuditEvent
from nodes import geolocation
from nodes.forms import UnitRegisterForm
from nodes.models import Unit
from nodes.services import (
    unit_enrol,
    unit_location_attest,
    unit_location_attestation_revoke,
    unit_location_declare,
    unit_register,
)
from tests.conftest import agent_client, gpus_make, job_make, unit_online

HEARTBEAT = "/api/agent/v1/heartbeat"
ENROL = "/api/agent/v1/enrol"
IN_GERMANY = "130.149.7.201"  # TU Berlin, in a block the DFN has held since the 1990s
ALSO_IN_GERMANY = "2001:638::1"  # DFN's IPv6 allocation
IN_THE_US = "8.8.8.8"  # Google Public DNS


def actions(unit) -> list[str]:
    return list(AuditEvent.objects.filter(subject_id=unit.pk).values_list("action", flat=True))


def fresh(unit) -> Unit:
    return Unit.objects.get(pk=unit.pk)


def beat(agent, address: str, **headers):
    body = {"gpus": [asdict(gpu) for gpu in gpus_make(2, prefix="GPU-shed")]}
    response = agent.post(HEARTBEAT, body, format="json", REMOTE_ADDR=address, **headers)
    assert response.status_code == 200, response.content
    return response


@pytest.fixture
def shed(owner):
    """A unit declared in Germany (Bavaria), online with two GPUs, with no location evidence yet."""
    unit, credential = unit_online(owner, name="shed", gpus=2)
    unit_location_declare(unit=unit, country="DE", subdivision="DE-BY", actor="test")
    return fresh(unit), agent_client(credential)


@pytest.fixture
def operator(db):
    return get_user_model().objects.create_superuser(username="oscar-operator", password="pw-oscar")


class TestGeolocation:
    @pytest.mark.parametrize(
        "address, country",
        [(IN_GERMANY, "DE"), (ALSO_IN_GERMANY, "DE"), (IN_THE_US, "US"), (f"::ffff:{IN_GERMANY}", "DE")],
    )
    def test_a_public_address_gives_its_country(self, address, country):
        assert geolocation.country_of(address) == country

    @pytest.mark.parametrize(
        "address",
        ["10.1.2.3", "192.168.1.10", "172.16.0.1", "127.0.0.1", "::1", "fe80::1", "100.64.0.1", "192.0.2.1", ""],
    )
    def test_a_private_loopback_shared_or_reserved_address_is_no_evidence(self, address):
        assert geolocation.country_of(address) == ""

    def test_something_that_is_not_an_address_is_no_evidence(self):
        assert geolocation.country_of("shed.example") == ""

    def test_the_lookup_never_touches_the_network(self, monkeypatch):
        def refuse(*args, **kwargs):
            raise AssertionError("the geolocation lookup tried to use the network")

        monkeypatch.setattr(socket, "getaddrinfo", refuse)
        monkeypatch.setattr(socket.socket, "connect", refuse)

        assert geolocation.country_of(IN_GERMANY) == "DE"


class TestEvidenceFromTheAgent:
    def test_a_heartbeat_from_the_declared_country_verifies_the_unit(self, shed):
        unit, agent = shed

        beat(agent, IN_GERMANY)

        unit = fresh(unit)
        assert (unit.observed_ip, unit.observed_country, unit.location_verified) == (IN_GERMANY, "DE", True)
        assert unit.observed_at is not None
        assert "unit.location_verified" in actions(unit)

    def test_a_heartbeat_from_another_country_unverifies_the_unit_audits_and_bumps_its_version(self, shed):
        unit, agent = shed
        beat(agent, IN_GERMANY)
        version = fresh(unit).capacity_version

        beat(agent, IN_THE_US)

        unit = fresh(unit)
        assert (unit.observed_country, unit.location_verified) == ("US", False)
        assert unit.capacity_version > version
        mismatch = AuditEvent.objects.get(action="unit.location_mismatch", subject_id=unit.pk)
        assert mismatch.data | {"declared": "DE", "observed": "US", "address": IN_THE_US} == mismatch.data
        assert "unit.location_unverified" in actions(unit)

    def test_a_mismatch_outweighs_an_attestation(self, shed, operator):
        unit, agent = shed
        unit_location_attest(unit=unit, by=operator)
        assert fresh(unit).location_verified

        beat(agent, IN_THE_US)

        assert not fresh(unit).location_verified

    def test_a_private_address_is_no_evidence_either_way(self, shed):
        unit, agent = shed
        beat(agent, IN_GERMANY)

        beat(agent, "192.168.1.10")

        unit = fresh(unit)
        assert (unit.observed_ip, unit.observed_country, unit.location_verified) == ("192.168.1.10", "", False)
        assert "unit.location_mismatch" not in actions(unit)

    def test_the_address_is_looked_up_only_when_it_changes(self, shed, monkeypatch):
        unit, agent = shed
        looked_up = []
        real = geolocation.country_of
        monkeypatch.setattr(geolocation, "country_of", lambda address: looked_up.append(address) or real(address))

        for _ in range(3):
            beat(agent, IN_GERMANY)
        beat(agent, IN_THE_US)

        assert looked_up == [IN_GERMANY, IN_THE_US]

    def test_forwarded_for_is_ignored_unless_a_proxy_is_trusted(self, shed):
        unit, agent = shed

        beat(agent, "10.0.0.2", HTTP_X_FORWARDED_FOR=IN_THE_US)

        assert (fresh(unit).observed_ip, fresh(unit).observed_country) == ("10.0.0.2", "")

    def test_behind_a_trusted_proxy_the_hop_it_saw_is_the_address(self, shed, settings):
        unit, agent = shed
        settings.TRUSTED_PROXY_COUNT = 1

        # The caller wrote the first hop itself; the proxy appended the address it connected from.
        beat(agent, "10.0.0.2", HTTP_X_FORWARDED_FOR=f"{IN_THE_US}, {IN_GERMANY}")

        assert (fresh(unit).observed_ip, fresh(unit).location_verified) == (IN_GERMANY, True)

    def test_enrolment_records_the_agents_address(self, owner):
        unit, token = unit_register(owner=owner, name="shed", country="DE")

        response = APIClient().post(
            ENROL, {"token": token, "hostname": "shed.local", "agent_version": "1.0"}, format="json",
            REMOTE_ADDR=ALSO_IN_GERMANY,
        )  # fmt: skip

        assert response.status_code == 201, response.content
        unit = fresh(unit)
        assert (unit.observed_ip, unit.observed_country, unit.location_verified) == (ALSO_IN_GERMANY, "DE", True)

    def test_enrolment_through_the_service_without_an_address_records_nothing(self, owner):
        unit, token = unit_register(owner=owner, name="shed", country="DE")

        unit, _ = unit_enrol(token=token, hostname="shed.local", agent_version="1.0")

        assert (unit.observed_ip, unit.observed_country, unit.location_verified) == (None, "", False)


class TestAttestation:
    def test_an_attestation_of_the_declared_location_verifies_the_unit(self, shed, operator):
        unit, _ = shed
        version = unit.capacity_version

        unit_location_attest(unit=unit, by=operator)

        unit = fresh(unit)
        assert unit.location_verified
        assert (unit.attested_country, unit.attested_subdivision, unit.attested_by) == ("DE", "DE-BY", operator)
        assert unit.capacity_version > version
        assert {"unit.location_attested", "unit.location_verified"} <= set(actions(unit))

    def test_changing_the_declared_country_voids_the_attestation(self, shed, operator):
        unit, _ = shed
        unit_location_attest(unit=unit, by=operator)
        version = fresh(unit).capacity_version

        unit_location_declare(unit=fresh(unit), country="FR", subdivision="", actor="user:owner")

        unit = fresh(unit)
        assert not unit.location_verified
        assert unit.attested_country == "DE"  # kept on record, without effect
        assert unit.capacity_version > version
        assert "unit.location_declared" in actions(unit)

    def test_changing_only_the_subdivision_voids_it_too(self, shed, operator):
        unit, _ = shed
        unit_location_attest(unit=unit, by=operator)

        unit_location_declare(unit=fresh(unit), country="DE", subdivision="DE-BE", actor="user:owner")

        assert not fresh(unit).location_verified

    def test_a_unit_verified_by_its_address_stays_verified_when_the_subdivision_changes(self, shed):
        unit, agent = shed
        beat(agent, IN_GERMANY)

        unit_location_declare(unit=fresh(unit), country="DE", subdivision="DE-BE", actor="user:owner")

        assert fresh(unit).location_verified

    def test_revoking_the_attestation_unverifies_the_unit(self, shed, operator):
        unit, _ = shed
        unit_location_attest(unit=unit, by=operator)

        unit_location_attestation_revoke(unit=fresh(unit), by=operator)

        unit = fresh(unit)
        assert not unit.location_verified
        assert (unit.attested_country, unit.attested_at) == ("", None)

    def test_a_subdivision_outside_the_country_is_refused(self, shed):
        unit, _ = shed

        with pytest.raises(ValueError):
            unit_location_declare(unit=unit, country="FR", subdivision="DE-BY", actor="user:owner")


class TestAdmin:
    CHANGELIST = "/admin/nodes/unit/"

    def admin(self, operator) -> Client:
        client = Client()
        client.force_login(operator)
        return client

    def test_the_operator_attests_and_revokes_from_the_unit_list(self, shed, operator):
        unit, _ = shed
        client = self.admin(operator)

        response = client.post(self.CHANGELIST, {"action": "attest_location", "_selected_action": [str(unit.pk)]})

        assert response.status_code == 302
        assert fresh(unit).location_verified and fresh(unit).attested_by == operator

        client.post(self.CHANGELIST, {"action": "revoke_attestation", "_selected_action": [str(unit.pk)]})

        assert not fresh(unit).location_verified

    def test_the_unit_page_shows_the_evidence(self, shed, operator, settings):
        settings.STORAGES = {
            **settings.STORAGES,
            "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        }
        unit, agent = shed
        beat(agent, IN_GERMANY)

        page = self.admin(operator).get(f"{self.CHANGELIST}{unit.pk}/change/").content.decode()

        assert IN_GERMANY in page
        assert 'name="observed_country"' not in page  # read-only: shown, never edited

    def test_changing_the_country_in_the_admin_re_verifies(self, shed, operator, rf):
        unit, _ = shed
        unit_location_attest(unit=unit, by=operator)
        unit = fresh(unit)
        request = rf.post("/")
        request.user = operator
        # What the admin's change form hands save_model when only the location was edited.
        form = SimpleNamespace(
            changed_data=["country", "subdivision"], initial={"country": unit.country, "subdivision": "DE-BY"}
        )
        unit.country, unit.subdivision = "FR", ""

        admin.site._registry[Unit].save_model(request, unit, form, change=True)

        assert (fresh(unit).country.code, fresh(unit).location_verified) == ("FR", False)
        declared = AuditEvent.objects.get(
            action="unit.location_declared", subject_id=unit.pk, actor=f"user:{operator.pk}"
        )
        assert (declared.data["previous_country"], declared.data["country"]) == ("DE", "FR")


class TestPlacement:
    def test_a_mismatch_takes_the_unit_out_of_all_residency_restricted_work_at_once(self, shed, renter):
        unit, agent = shed
        beat(agent, IN_GERMANY)
        first = job_make(renter, jurisdictions=["EU"], require_verified_location=True)
        assert job_place(job_id=first.pk).unit_id == unit.pk

        beat(agent, IN_THE_US)
        second = job_make(renter, jurisdictions=["EU"], require_verified_location=True)
        unverified_is_enough = job_make(renter, jurisdictions=["EU"])

        # The first job was stopped by the same rule (marketplace/jobs/residency.py): its GPU is free.
        assert Job.objects.get(pk=first.pk).state == Job.State.QUEUED
        assert job_place(job_id=second.pk) is None
        assert Job.objects.get(pk=second.pk).pending_reason["rejected"] == {"location_disputed": 1}
        # Evidence against the declaration is not mere absence of evidence: no restricted job comes.
        assert job_place(job_id=unverified_is_enough.pk) is None
        assert job_place(job_id=job_make(renter).pk).unit_id == unit.pk

    def test_an_unverified_unit_still_takes_work_that_does_not_ask_for_verification(self, shed, renter):
        unit, agent = shed
        beat(agent, "192.168.1.20")  # a private address: no evidence either way

        allocation = job_place(job_id=job_make(renter, jurisdictions=["DE-BY"]).pk)

        assert not fresh(unit).location_verified
        assert allocation is not None and allocation.unit_id == unit.pk

    def test_an_attested_unit_takes_verified_only_work_in_its_subdivision(self, shed, renter, operator):
        unit, _ = shed
        unit_location_attest(unit=unit, by=operator)

        allocation = job_place(job_id=job_make(renter, jurisdictions=["DE-BY"], require_verified_location=True).pk)

        assert allocation is not None and allocation.unit_id == unit.pk
        record = AuditEvent.objects.get(action="job.placed", subject_id=allocation.job_id).data["policy"]
        assert record["jurisdiction"] == {"required": ["DE-BY"], "unit": "DE-BY", "matched": "DE-BY"}
        assert record["verified_location"]["verified"] is True

    def test_the_agent_is_sent_the_countries_a_named_set_admits(self, shed, renter):
        unit, agent = shed
        job_place(job_id=job_make(renter, jurisdictions=["DACH", "FR-IDF"]).pk)

        assignment = agent.get("/api/agent/v1/assignments/next").json()

        assert assignment["job"]["allowed_countries"] == ["AT", "CH", "DE", "FR"]


class TestDeclaring:
    @pytest.mark.parametrize("subdivision, valid", [("DE-BY", True), ("DE-ZZ", False), ("FR-IDF", False), ("", True)])
    def test_the_register_form_takes_only_real_subdivisions_of_the_country(self, subdivision, valid):
        form = UnitRegisterForm(data={"name": "Shed", "country": "DE", "subdivision": subdivision})

        assert form.is_valid() is valid, form.errors
