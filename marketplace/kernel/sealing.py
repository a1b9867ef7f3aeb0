"""Sealing: values the platform must be able to read back (renters' secrets) encrypted at rest
with keys of their own, not SECRET_KEY (which keys the token HMACs and would expose both at once).

SECRETS_KEYS lists Fernet keys, newest first: values are sealed with the first and unsealed with
any, so a key is rotated by putting a new one in front, running ``manage.py secrets_rotate``
(every value sealed again with the new key) and then dropping the old one.
"""

from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


class SealingUnavailable(Exception):
    """No key is configured: nothing can be sealed or unsealed."""


class Unreadable(Exception):
    """A sealed value no configured key opens (its key was dropped), or not a sealed value at all."""


@cache
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(key) for key in keys])


def _keys() -> MultiFernet:
    keys = tuple(settings.SECRETS_KEYS)
    if not keys or not all(key_valid(key) for key in keys):
        raise SealingUnavailable("SECRETS_KEYS holds no key, or one that is not a Fernet key.")
    return _fernet(keys)


def seal(value: str) -> str:
    return _keys().encrypt(value.encode()).decode("ascii")


def unseal(sealed: str) -> str:
    try:
        return _keys().decrypt(sealed.encode("ascii")).decode()
    except (InvalidToken, UnicodeError):
        raise Unreadable("No configured key opens this value.") from None


def reseal(sealed: str) -> str:
    """The value sealed again with the newest key."""
    try:
        return _keys().rotate(sealed.encode("ascii")).decode("ascii")
    except (InvalidToken, UnicodeError):
        raise Unreadable("No configured key opens this value.") from None


def key_valid(key: str) -> bool:
    try:
        Fernet(key)
    except (ValueError, TypeError):
        return False
    return True
