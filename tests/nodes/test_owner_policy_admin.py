"""Operators' side of the owner policy: the unit admin's policy group and verifying renters."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from marketplace.accounts.models import RenterProfile
from marketplace.accounts.selectors import renter_verified
from marketplace.kernel.models import AuditEvent
from nodes.services import unit_register
from tests.conftest import job_make, user_make


@pytest.fixture
def operator(db):
    return user_make("otto-operator", is_staff=True, is_superuser=True)


def admin_form_data(page) -> dict:
    """The change form's current values, as a browser would send them back."""
    form, data = page.context["adminform"].form, {}
    for name, field in form.fields.items():
        value = form[name].value()
        if hasattr(field.widget, "decompress"):  # split date and time inputs
            for index, part in enumerate(field.widget.decompress(value)):
                data[f"{name}_{index}"] = "" if part is None else str(part)
        else:
            data[name] = "" if value is None else value
    return data


def admin_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def plain_static(settings):
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


def test_the_unit_admin_groups_the_owner_policy_and_shows_reliability_read_only(owner, operator, plain_static):
    unit, _ = unit_register(owner=owner, name="Garden shed", country="DE")

    page = admin_client(operator).get(f"/admin/nodes/unit/{unit.pk}/change/").content.decode()

    assert "Owner policy" in page
    assert 'name="availability"' in page and 'name="workload_classes"' in page
    assert 'name="reliability"' not in page


def test_a_renter_without_a_verified_profile_is_not_verified(renter):
    assert not renter_verified(renter.pk)
    RenterProfile.objects.create(user=renter)
    assert not renter_verified(renter.pk)


def test_the_operator_verifies_renters_from_the_list(renter, stranger, operator):
    earlier = timezone.now() - timedelta(days=3)
    profile = RenterProfile.objects.create(user=renter)
    RenterProfile.objects.create(user=stranger, verified_at=earlier)

    response = admin_client(operator).post(
        "/admin/accounts/renterprofile/",
        {"action": "verify_renter", "_selected_action": [str(profile.pk), str(stranger.renter_profile.pk)]},
    )

    assert response.status_code == 302
    assert renter_verified(renter.pk)
    assert RenterProfile.objects.get(user=stranger).verified_at == earlier  # the first verification stands
    assert [e.subject_id for e in AuditEvent.objects.filter(action="renter.verified")] == [renter.public_id]


def test_a_policy_edit_in_the_admin_goes_through_the_service_and_is_audited(owner, operator, plain_static):
    unit, _ = unit_register(owner=owner, name="Garden shed", country="DE")
    client = admin_client(operator)
    data = admin_form_data(client.get(f"/admin/nodes/unit/{unit.pk}/change/"))
    data.update({"price_per_gpu_hour_micros": 3_500_000, "gpus-TOTAL_FORMS": 0, "gpus-INITIAL_FORMS": 0})
    version = unit.capacity_version

    response = client.post(f"/admin/nodes/unit/{unit.pk}/change/", data)

    assert response.status_code == 302, response.context["errors"] if response.context else ""
    unit.refresh_from_db()
    assert unit.price_per_gpu_hour_micros == 3_500_000
    assert unit.capacity_version > version
    changed = AuditEvent.objects.get(action="unit.policy_changed", subject_id=unit.pk)
    assert changed.actor == f"user:{operator.pk}"
    assert changed.data["price_per_gpu_hour_micros"] == 3_500_000


def test_job_state_cannot_be_set_in_the_admin_only_cancelled_through_the_service(renter, operator):
    job = job_make(renter)
    client = admin_client(operator)

    edit = client.post(f"/admin/jobs/job/{job.pk}/change/", {"state": "succeeded"})
    cancel = client.post("/admin/jobs/job/", {"action": "cancel_jobs", "_selected_action": [str(job.pk)]})

    assert edit.status_code == 403
    assert cancel.status_code == 302
    job.refresh_from_db()
    assert job.state == job.State.CANCELLED
    assert AuditEvent.objects.filter(action="job.cancelled", subject_id=job.pk, actor=f"user:{operator.pk}").exists()
