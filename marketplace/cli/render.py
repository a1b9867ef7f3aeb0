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

OUTPUT_COLUMNS: list[Column] = [
    ("PATH", lambda o: o.get("path")),
    ("SIZE", lambda o: (o.get("uploaded") or {}).get("size")),
    ("SHA-256", lambda o: (o.get("uploaded") or {}).get("sha256")),
    ("UPLOADED", lambda o: (o.get("uploaded") or {}).get("at") or "not uploaded"),
    ("WHERE", lambda o: o.get("jurisdiction")),
    ("DESTINATION", lambda o: o.get("endpoint")),
]


def services(job: dict[str, Any]) -> list[str]:
    """How to reach the job's ports once it runs: a URL (with your API key, or an endpoint
    token) or the forward command."""
    lines = []
    for service in job.get("services") or []:
        reach = service.get("url") or service.get("forward")
        lines.append(f"  port {service.get('port')} ({service.get('protocol')}): {reach}")
    return lines


def residency(record: dict[str, Any]) -> list[str]:
    """The residency record in lines a person reads; `--json` prints all of it."""
    rules = record.get("rules", {})
    isolation = record.get("isolation", {})
    allowed = rules.get("jurisdictions")
    lines = [
        f"Job {record.get('job')} ({record.get('name') or 'unnamed'}), {record.get('state')}",
        f"  Rules       jurisdictions {cell(allowed)}; verified location "
        f"{'required' if rules.get('require_verified_location') else 'not required'}",
    ]
    for placement in record.get("placements", []):
        where = placement.get("subdivision") or placement.get("country")
        location = placement.get("location", {})
        lines.append(
            f"  Ran on      unit {placement.get('unit')} in {where} ({location.get('how')}), "
            f"from {placement.get('started_at') or 'never started'} to {placement.get('released_at') or 'now'}"
        )
        lines.append(f"              image {placement.get('image')} {placement.get('image_digest') or ''}".rstrip())
    network = isolation.get("network")
    lines.append(f"  Isolation   {isolation.get('level')}, {isolation.get('runtime')}; network: {network}")
    if isolation.get("short_of_request"):
        lines.append(f"  WARNING     {isolation['short_of_request']}")
    data = record.get("data", {})
    for name, label, way in (("inputs", "Input", "from"), ("outputs", "Output", "to")):
        moved = {}
        for staging in data.get(name, {}).get("staged", []):
            for file in staging.get("files", []):
                moved[file["path"]] = f"{file['size']} bytes, SHA-256 {file['sha256']}, {staging.get('at')}"
            if not staging.get("ok"):
                lines.append(f"  {label} failed: {staging.get('reason')} ({staging.get('detail')})")
        for item in data.get(name, {}).get("declared", []):
            what = moved.get(item["path"], "not moved")
            lines.append(f"  {label:<11} {item['path']} {way} {item['endpoint']} ({item['jurisdiction']}): {what}")
    delivered = record.get("secrets", {}).get("delivered_to", [])
    for handover in delivered:
        variables = cell(record.get("secrets", {}).get("variables"))
        lines.append(f"  Secrets     {variables} handed to {handover.get('actor')} at {handover.get('at')}")
    for row in record.get("services", {}).get("traffic", []):
        lines.append(
            f"  Served      port {row['port']} on {row['day']} through a relay in {row['relayed_in']}: "
            f"{row['requests']} requests, {row['bytes_in']} bytes in, {row['bytes_out']} bytes out"
        )
    lines.append(f"  Audit       {len(record.get('events', []))} events (--json lists them)")
    return lines
