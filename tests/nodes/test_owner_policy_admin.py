"""Operators' side of the owner policy: the unit admin's policy group and verifying renters."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from marketplace.accounts.models import RenterProfile
from marketplace.accounts.selectors import renter_verified
from nodes.services import unit_register
from tests.conftest import user_make


@pytest.fixture
def operator(db):
    return user_make("otto-operator", is_staff=True, is_superuser=True)


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
