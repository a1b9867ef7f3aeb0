"""Human output: aligned tables and short lines. `--json` bypasses all of this."""

from collections.abc import Callable, Sequence
from typing import Any

import click

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def cell(value: Any) -> str:
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(item) for item in value)
    if isinstance(value, dict):
        return ",".join(f"{key}={cell(item)}" for key, item in value.items())
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], *, empty: str) -> None:
    if not rows:
        click.echo(empty)
        return
    cells = [[cell(get(row)) for _, get in columns] for row in rows]
    headers = [name for name, _ in columns]
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(columns))]
    for line in [headers, *cells]:
        click.echo("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())


OFFER_COLUMNS: list[Column] = [
    ("UNIT", lambda o: o.get("unit")),
    ("WHERE", lambda o: o.get("subdivision") or o.get("country")),
    ("VERIFIED", lambda o: o.get("location_verified")),
    ("GPU", lambda o: o.get("gpu_model")),
    ("VRAM", lambda o: None if o.get("vram_gb") is None else f"{o['vram_gb']} GB"),
    ("FREE", lambda o: o.get("free_gpus")),
    ("ISOLATION", lambda o: o.get("isolation_levels")),
    ("PRICE/GPU-H", lambda o: o.get("price_per_gpu_hour")),
    ("RELIABILITY", lambda o: o.get("reliability")),
    ("LIMITS", lambda o: o.get("limits_in_force")),
]

JOB_COLUMNS: list[Column] = [
    ("ID", lambda j: j.get("id")),
    ("NAME", lambda j: j.get("name")),
    ("STATE", lambda j: j.get("state")),
    ("GPUS", lambda j: j.get("gpu_count")),
    ("IMAGE", lambda j: j.get("image")),
    ("WHERE", lambda j: (j.get("placement") or {}).get("subdivision") or (j.get("placement") or {}).get("country")),
    ("COST", lambda j: (j.get("usage") or {}).get("cost")),
    ("CREATED", lambda j: j.get("created_at")),
]


def job_line(job: dict[str, Any]) -> str:
    line = f"{job.get('id')}  {job.get('state')}"
    if job.get("state") == "queued" and job.get("pending_summary"):
        line += f"  ({job['pending_summary']})"
    if job.get("failure_reason"):
        line += f"  {job['failure_reason']}"
    if job.get("exit_code") is not None:
        line += f"  exit code {job['exit_code']}"
    return line


SECRET_COLUMNS: list[Column] = [
    ("NAME", lambda s: s.get("name")),
    ("CREATED", lambda s: s.get("created_at")),
    ("UPDATED", lambda s: s.get("updated_at")),
]

TEMPLATE_COLUMNS: list[Column] = [
    ("NAME", lambda t: t.get("name")),
    ("IMAGE", lambda t: (t.get("spec") or {}).get("image")),
    ("GPUS", lambda t: (t.get("spec") or {}).get("gpu_count")),
    ("UPDATED", lambda t: t.get("updated_at")),
]
