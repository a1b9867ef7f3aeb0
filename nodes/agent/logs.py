"""One log line per event, as key=value pairs that grep and log shippers can split."""

import json
import logging
import sys
from typing import Any


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, "event=%s%s", name, "".join(f" {k}={_value(v)}" for k, v in fields.items()))


def _value(value: Any) -> str:
    if isinstance(value, list | tuple):
        value = ",".join(str(item) for item in value)
    text = str(value)
    if not text or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


def setup(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    # httpx logs every request at INFO; the agent logs the events that matter itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
