"""Query parameters read by hand, bounded like every other number from outside (kernel.numbers)."""

from rest_framework.exceptions import ValidationError

from marketplace.kernel.numbers import NumberError, int_parse


def query_int(params, name: str, *, default: int, minimum: int, maximum: int) -> int:
    """The whole-number parameter ``name``, or ``default``; a 400 naming it when out of bounds."""
    raw = params.get(name)
    if raw is None:
        return default
    try:
        return int_parse(raw, minimum=minimum, maximum=maximum)
    except NumberError as error:
        raise ValidationError({name: [str(error)]}) from None
