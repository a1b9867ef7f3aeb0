"""Operators drain a unit that misbehaves from the unit admin, and resume it; staff who may only
look cannot."""

import pytest
from django.contrib.auth.models import Permission

from marketplace.kernel.models import AuditEvent
from nodes.models import Unit
from tests.conftest import admin_action, unit_online, user_make

pytestmark = pytest.mark.django_db


@pytest.fixture
def clerk(db):
    user = user_make("clara-clerk", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename="view_unit"))
    return user


def test_the_operator_drains_a_unit_and_resumes_it(operator, owner):
    unit, _ = unit_online(owner, name="shed")

    assert admin_action(operator, "drain", [unit]) == ["shed: draining."]
    assert admin_action(operator, "resume", [unit]) == ["shed: online."]

    assert Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE
    trail = AuditEvent.objects.filter(subject_id=unit.pk, action__startswith="unit.drain").order_by("id")
    assert [(e.action, e.actor) for e in trail] == [
        ("unit.drain_started", f"user:{operator.pk}"),
        ("unit.drain_ended", f"user:{operator.pk}"),
    ]


def test_a_unit_that_is_offline_is_reported_not_drained(operator, owner):
    unit, _ = unit_online(owner, name="shed")
    Unit.objects.filter(pk=unit.pk).update(status=Unit.Status.OFFLINE)

    assert admin_action(operator, "drain", [unit]) == ["shed: Only an online unit can be drained; this one is offline."]


def test_staff_who_may_only_look_cannot_drain(clerk, owner, plain_static):
    unit, _ = unit_online(owner, name="shed")

    admin_action(clerk, "drain", [unit])

    assert Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE
