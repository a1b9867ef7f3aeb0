"""The owner portal's placement policy form on the unit page."""

import pytest
from django.core.exceptions import ValidationError
from django.test import Client

from marketplace.models import AuditEvent
from nodes.models import Unit
from nodes.services import unit_policy_update, unit_register

POLICY = {
    "price_per_gpu_hour": "2.5",
    "isolation_levels": ["gpu", "node"],
    "workload_classes": ["training", "batch"],
    "renters_accepted": "verified",
    "interruptible_price_percent": "40",
    "max_job_hours": "12",
    "availability": "mon-fri 08:00-20:00\nfri-sun 22:00-06:00",
}


@pytest.fixture
def unit(owner):
    unit, _ = unit_register(owner=owner, name="Garden shed", country="DE")
    return unit


def policy_url(unit) -> str:
    return f"/portal/units/{unit.pk}/policy/"


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def stored(unit) -> Unit:
    return Unit.objects.get(pk=unit.pk)


def test_the_unit_page_shows_the_policy_filled_in(owner, unit):
    unit_policy_update(
        unit=unit, actor="test", availability=[{"days": [0, 1, 2, 3, 4], "start": "08:00", "end": "20:00"}]
    )

    response = logged_in(owner).get(f"/portal/units/{unit.pk}/")

    assert response.status_code == 200
    form = response.context["policy_form"]
    assert form.initial["availability"] == "mon-fri 08:00-20:00"
    assert form.initial["price_per_gpu_hour"] == 2
    assert "Placement policy" in response.content.decode()


def test_an_owner_saves_their_units_policy(owner, unit):
    version = stored(unit).capacity_version

    response = logged_in(owner).post(policy_url(unit), POLICY)

    assert response.status_code == 302
    assert response["Location"] == f"/portal/units/{unit.pk}/"
    saved = stored(unit)
    assert saved.price_per_gpu_hour_micros == 2_500_000
    assert saved.isolation_levels == ["gpu", "node"]
    assert saved.workload_classes == ["training", "batch"]
    assert saved.renters_accepted == "verified"
    assert saved.interruptible_price_percent == 40
    assert saved.max_job_duration_s == 12 * 3600
    assert saved.availability == [
        {"days": [0, 1, 2, 3, 4], "start": "08:00", "end": "20:00"},
        {"days": [4, 5, 6], "start": "22:00", "end": "06:00"},
    ]
    assert saved.capacity_version > version
    assert AuditEvent.objects.filter(action="unit.policy_changed", subject_id=unit.pk).exists()


def test_empty_availability_and_duration_mean_always_and_any_length(owner, unit):
    unit_policy_update(
        unit=unit, actor="test", max_job_duration_s=60, availability=[{"days": [0], "start": "08:00", "end": "09:00"}]
    )

    response = logged_in(owner).post(policy_url(unit), {**POLICY, "availability": "", "max_job_hours": ""})

    assert response.status_code == 302
    assert stored(unit).availability == []
    assert stored(unit).max_job_duration_s is None


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("availability", "mon-fri 08:00-08:00", "Line 1: start and end are the same time"),
        ("availability", "mon-fri 8 to 20", "Line 1: write days then times"),
        ("availability", "mon 08:00-20:00\nfunday 08:00-09:00", 'Line 2: "funday" is not a day'),
        ("availability", "mon 08:00-25:00", "is not a time between 00:00 and 24:00"),
        ("isolation_levels", [], "This field is required."),
        ("isolation_levels", ["vm"], "Select a valid choice."),
        ("workload_classes", ["mining"], "Select a valid choice."),
        ("renters_accepted", "friends", "Select a valid choice."),
        ("price_per_gpu_hour", "-1", "greater than or equal to 0"),
        ("max_job_hours", "0", "greater than or equal to 0.01"),
    ],
)
def test_a_bad_policy_is_answered_with_a_form_error_and_changes_nothing(owner, unit, field, value, message):
    before = stored(unit)

    response = logged_in(owner).post(policy_url(unit), {**POLICY, field: value})

    assert response.status_code == 200
    form = response.context["policy_form"]
    assert any(message in error for error in form.errors[field]), form.errors
    after = stored(unit)
    assert (after.availability, after.capacity_version) == (before.availability, before.capacity_version)
    assert message.replace('"', "&quot;") in response.content.decode()


def test_a_check_only_the_model_makes_lands_above_the_form(owner, unit):
    Unit.objects.filter(pk=unit.pk).update(time_zone="Mars/Olympus")  # set outside the form

    response = logged_in(owner).post(policy_url(unit), POLICY)

    assert response.status_code == 200
    assert "is not an IANA time zone" in response.context["policy_form"].non_field_errors()[0]
    assert stored(unit).availability == []


def test_another_owner_gets_not_found_and_changes_nothing(stranger, unit):
    version = stored(unit).capacity_version

    response = logged_in(stranger).post(policy_url(unit), POLICY)

    assert response.status_code == 404
    assert stored(unit).capacity_version == version
    assert stored(unit).renters_accepted == "any"


def test_the_policy_form_needs_login_and_a_post(owner, unit):
    assert Client().post(policy_url(unit), POLICY).status_code == 302
    assert logged_in(owner).get(policy_url(unit)).status_code == 405


def test_the_service_refuses_what_is_not_policy(unit):
    with pytest.raises(TypeError, match="not policy fields"):
        unit_policy_update(unit=unit, actor="test", status="online")


def test_unit_clean_checks_and_normalises_the_policy(unit):
    unit.isolation_levels = ["node", "gpu", "gpu"]
    unit.availability = [{"days": [2, 1], "start": "9:00", "end": "17:00"}]
    unit.clean()
    assert unit.isolation_levels == ["gpu", "node"]
    assert unit.availability == [{"days": [1, 2], "start": "09:00", "end": "17:00"}]

    unit.workload_classes, unit.isolation_levels, unit.renters_accepted = [], ["vm"], "friends"
    unit.availability = [{"days": [8], "start": "09:00", "end": "17:00"}]
    with pytest.raises(ValidationError) as raised:
        unit.clean()
    assert set(raised.value.message_dict) == {
        "workload_classes",
        "isolation_levels",
        "renters_accepted",
        "availability",
    }
