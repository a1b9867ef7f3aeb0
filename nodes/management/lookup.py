"""What the runbook commands share: the one unit an operator names."""

from django.core.management.base import CommandError

from nodes.models import Unit
from nodes.selectors import units_named


def unit_named(reference: str) -> Unit:
    """The unit with this id, or the only unit of this name; else a readable CommandError."""
    found = list(units_named(reference))
    if not found:
        raise CommandError(f"No unit has the id or name {reference!r}.")
    if len(found) > 1:
        ids = ", ".join(f"{u.pk} (owner {u.owner})" for u in found)
        raise CommandError(f"{len(found)} units are named {reference!r}; name one by its id: {ids}.")
    return found[0]
