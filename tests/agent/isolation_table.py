"""The isolation table in the README's security section, filled in by the real-engine tests.

Each test records what it observed for a probe under a runtime; at the end of its module the
table is written to $ISOLATION_REPORT, between the table's markers when that file has them (as
README.md does), else appended with them. Without the variable nothing is written.
"""

import os
from collections.abc import Callable
from pathlib import Path

RUNTIME_NAMES = {"runc": "observed under runc", "runsc": "observed under gVisor"}


class Table:
    def __init__(self, name: str, expected: dict[str, str]) -> None:
        self.name = name
        self.expected = expected  # probe -> what the promise says, in table order
        self.seen: dict[str, dict[str, str]] = {}

    def observer(self, runtime: str) -> Callable[[str, str], str]:
        """Record (probe, observed) under this runtime; returns what it recorded, for asserts."""

        def observe(probe: str, value: str) -> str:
            assert probe in self.expected, f"{probe!r} is not a row of the {self.name} table"
            self.seen.setdefault(probe, {})[runtime] = value
            return value

        return observe

    def markdown(self) -> str:
        header = ["probe", "expected", *RUNTIME_NAMES.values()]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for probe, expected in self.expected.items():
            seen = self.seen.get(probe, {})
            cells = [probe, expected, *(seen.get(runtime, "not run") for runtime in RUNTIME_NAMES)]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        return "\n".join(lines)

    def write(self) -> None:
        target = os.environ.get("ISOLATION_REPORT")
        if not target:
            return
        path = Path(target)
        begin, end = f"<!-- {self.name}-table: written by the real-engine tests -->", f"<!-- /{self.name}-table -->"
        block = f"{begin}\n{self.markdown()}\n{end}"
        text = path.read_text() if path.exists() else ""
        if begin in text and end in text:
            head, _, rest = text.partition(begin)
            _, _, tail = rest.partition(end)
            text = head + block + tail
        else:
            text += ("\n" if text else "") + block + "\n"
        path.write_text(text)
