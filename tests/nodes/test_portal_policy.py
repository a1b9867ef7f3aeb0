"""The owner portal's placement policy form on the unit page."""

import re
from datetime import time
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.test import Client

from marketplace.kernel.models import AuditEvent
from nodes.forms import UnitPolicyForm
from nodes.models import Unit
from nodes.services import unit_policy, unit_policy_update, unit_register

POLICY = {
    "price_per_gpu_hour": "2.5",
    "isolation_levels": ["gpu", "node"],
    "workload_classes": ["training", "batch"],
    "renters_accepted": "verified",
    "interruptible_price_percent": "40",
    "max_job_hours": "12",
    "availability": "mon-fri 08:00-20:00\nfri-sun 22:00-06:00",
    "slicing": "shared",
    "shared_fraction": "4",
    "time_zone": "Europe/Berlin",
    "quiet_hours_start": "22:00",
    "quiet_hours_end": "07:00",
    "quiet_hours_max_gpus": "1",
    "quiet_hours_power_cap_w": "300",
    "power_budget_kw": "3.5",
    "thermal_stop_c": "85",
    "thermal_resume_c": "78",
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
    assert (saved.slicing, saved.shared_fraction, saved.time_zone) == ("shared", 4, "Europe/Berlin")
    assert (saved.quiet_hours_start, saved.quiet_hours_end) == (time(22, 0), time(7, 0))
    assert (saved.quiet_hours_max_gpus, saved.quiet_hours_power_cap_w) == (1, 300)
    assert saved.power_budget_kw == Decimal("3.5")
    assert (saved.thermal_stop_c, saved.thermal_resume_c) == (85, 78)
    assert saved.capacity_version > version
    audit = AuditEvent.objects.get(action="unit.policy_changed", subject_id=unit.pk)
    assert (audit.data["quiet_hours_start"], audit.data["power_budget_kw"]) == ("22:00", "3.5")


def test_the_agent_gets_the_new_backyard_limits(owner, unit):
    logged_in(owner).post(policy_url(unit), POLICY)

    policy = unit_policy(stored(unit))

    assert policy["quiet_hours"] == {
        "start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin", "max_gpus": 1, "power_cap_w": 300,
    }  # fmt: skip
    assert (policy["power_budget_w"], policy["thermal_stop_c"], policy["thermal_resume_c"]) == (3500, 85, 78)
    assert (policy["slicing"], policy["shared_fraction"]) == ("shared", 4)


def test_empty_quiet_hours_and_power_budget_mean_none(owner, unit):
    response = logged_in(owner).post(
        policy_url(unit), {**POLICY, "quiet_hours_start": "", "quiet_hours_end": "", "power_budget_kw": ""}
    )

    assert response.status_code == 302
    saved = stored(unit)
    assert (saved.quiet_hours_start, saved.quiet_hours_end, saved.power_budget_kw) == (None, None, None)


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
        ("thermal_resume_c", "85", "The resume threshold must be below the stop threshold (85 °C)."),
        ("thermal_stop_c", "150", "less than or equal to 100"),
        ("quiet_hours_end", "22:00", "The end must differ from the start."),
        ("quiet_hours_end", "", "Give the end too, or leave both empty for no quiet hours."),
        ("quiet_hours_start", "", "Give the start too, or leave both empty for no quiet hours."),
        ("quiet_hours_start", "25:00", "Enter a valid time."),
        ("quiet_hours_max_gpus", "-1", "greater than or equal to 0"),
        ("power_budget_kw", "0", "greater than or equal to 0.1"),
        ("slicing", "quarters", "Select a valid choice."),
        ("shared_fraction", "9", "less than or equal to 8"),
        ("time_zone", "Mars/Olympus", "Select a valid choice."),
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


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("price_per_gpu_hour", "-1", "Ensure this value is greater than or equal to 0."),
        ("thermal_resume_c", "90", "The resume threshold must be below the stop threshold (85 °C)."),
        ("quiet_hours_start", "", "Give the start too, or leave both empty for no quiet hours."),
    ],
)
def test_each_error_is_shown_inside_its_fields_wrapper_and_described_by_it(owner, unit, field, value, message):
    page = logged_in(owner).post(policy_url(unit), {**POLICY, field: value}).content.decode()

    group = field_group(page, field)
    assert f'<ul class="errorlist" id="id_{field}_error"><li>{message}</li></ul>' in group
    control = re.search(rf'<input[^>]*name="{field}"[^>]*>', group).group(0)
    assert 'aria-invalid="true"' in control
    assert f"id_{field}_error" in re.search(r'aria-describedby="([^"]*)"', control).group(1)
    assert f'<label for="id_{field}">' in group
    assert f'href="#id_{field}"' in page  # the summary above the form links to it


def field_group(page: str, field: str) -> str:
    """The form field's wrapper, from its opening to the field's own control."""
    control = page.index(f'name="{field}"')
    return page[page.rindex('<div class="field', 0, control) : page.index(">", control) + 1]


def test_a_time_zone_set_outside_the_form_must_be_chosen_again(owner, unit):
    Unit.objects.filter(pk=unit.pk).update(time_zone="Mars/Olympus")
    page = logged_in(owner).get(f"/portal/units/{unit.pk}/").content.decode()
    select = page[page.index('<select name="time_zone"') : page.index("</select>", page.index('name="time_zone"'))]
    assert '<option value="">Choose a time zone…</option>' in select and "selected" not in select

    response = logged_in(owner).post(policy_url(unit), {**POLICY, "time_zone": ""})

    assert response.status_code == 200
    assert response.context["policy_form"].errors["time_zone"] == ["This field is required."]
    assert stored(unit).time_zone == "Mars/Olympus"


def test_a_model_error_lands_on_its_field_or_above_the_form(unit):
    form = UnitPolicyForm.for_unit(unit, POLICY)
    assert form.is_valid(), form.errors

    form.add_model_errors(
        ValidationError({"price_per_gpu_hour_micros": "Too dear.", "time_zone": "Not here.", "owner": "Not yours."})
    )

    assert form.errors["price_per_gpu_hour"] == ["Too dear."]
    assert form.errors["time_zone"] == ["Not here."]
    assert form.non_field_errors() == ["Not yours."]


def test_the_page_shows_what_each_slice_kind_costs_at_the_saved_price(owner, unit):
    unit_policy_update(unit=unit, actor="test", price_per_gpu_hour_micros=3_000_000, shared_fraction=4)
    unit_policy_update(unit=unit, actor="test", interruptible_price_percent=50)

    page = logged_in(owner).get(f"/portal/units/{unit.pk}/").content.decode()

    prices = page[page.index('<table id="slice-prices">') : page.index("</table>", page.index("slice-prices"))]
    rows = [re.sub(r"<[^>]+>|\s+", " ", row).split() for row in re.findall(r"<tr><td>.*?</tr>", prices, re.S)]
    assert [" ".join(row) for row in rows] == [
        "Whole GPU 3.00 USD 1.50 USD",
        "Shared, 1/4 of a GPU 0.75 USD 0.375 USD",
        "MIG instance, 10 GB of an 80 GB GPU 0.375 USD 0.1875 USD",
    ]


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
