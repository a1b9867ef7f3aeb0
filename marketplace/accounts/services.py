"""Writes to people's accounts: signing up and editing a profile."""

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from marketplace.accounts.selectors import email_in_use

EMAIL_TAKEN = "Another account already uses this email address."


def _email_free(email: str, *, user=None) -> None:
    # Password resets go to an address, so an address must lead to one account. The forms check
    # this first to show the error beside the field; this check is the one every write passes, and
    # the unique index on LOWER(email) (migration 0010) decides between two writes at once.
    if email_in_use(email, exclude=user):
        raise ValidationError({"email": EMAIL_TAKEN}, code="unique")


def user_sign_up(*, username: str, email: str, password: str):
    try:
        with transaction.atomic():
            _email_free(email)
            return get_user_model().objects.create_user(username=username, email=email, password=password)
    except IntegrityError:
        if email_in_use(email):
            raise ValidationError({"email": EMAIL_TAKEN}, code="unique") from None
        raise ValidationError({"username": "A user with that username already exists."}, code="unique") from None


def user_profile_update(*, user, first_name: str, last_name: str, email: str):
    try:
        with transaction.atomic():
            _email_free(email, user=user)
            user.first_name, user.last_name = first_name, last_name
            user.email = get_user_model().objects.normalize_email(email)
            user.save(update_fields=["first_name", "last_name", "email"])
            return user
    except IntegrityError:
        raise ValidationError({"email": EMAIL_TAKEN}, code="unique") from None
