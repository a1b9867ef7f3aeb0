"""Prefixed secrets stored as a lookup prefix plus an HMAC of the whole token.

A token reads ``<kind>_<lookup>_<secret>``. The lookup part finds the row without scanning; the
HMAC (keyed with SECRET_KEY) is compared in constant time, so a database leak does not reveal
usable tokens.
"""

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from django.conf import settings

LOOKUP_LENGTH = 12


@dataclass(frozen=True)
class IssuedToken:
    plaintext: str
    lookup: str
    digest: str


def token_digest(plaintext: str) -> str:
    key = settings.SECRET_KEY.encode()
    return hmac.new(key, plaintext.encode(), hashlib.sha256).hexdigest()


def token_issue(kind: str) -> IssuedToken:
    lookup = secrets.token_hex(LOOKUP_LENGTH // 2)
    plaintext = f"{kind}_{lookup}_{secrets.token_urlsafe(32)}"
    return IssuedToken(plaintext=plaintext, lookup=lookup, digest=token_digest(plaintext))


def token_lookup(plaintext: str, kind: str) -> str | None:
    """The lookup part of a well-formed token of this kind, or None."""
    if not plaintext.startswith(f"{kind}_"):
        return None
    rest = plaintext[len(kind) + 1 :]
    lookup, sep, secret = rest.partition("_")
    if not sep or len(lookup) != LOOKUP_LENGTH or not secret:
        return None
    return lookup


def token_matches(plaintext: str, digest: str) -> bool:
    return hmac.compare_digest(token_digest(plaintext), digest)
