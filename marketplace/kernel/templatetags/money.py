from django import template

from marketplace.kernel.money import from_micros

register = template.Library()


@register.filter
def micros(value: int) -> str:
    """Micro-units as a currency amount with two to six decimals, e.g. 2.5 or 0.002957."""
    amount = from_micros(value or 0)
    text = f"{amount:.6f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"
