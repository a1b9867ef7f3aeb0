from django import template

from marketplace.jobs import pending

register = template.Library()


@register.filter
def pending_summary(reason: dict) -> str:
    return pending.pending_summary(reason)
