"""Job spec files: YAML (when PyYAML is installed, as with `shedshare-cli`) or JSON."""

import json
from pathlib import Path
from typing import Any

import click

try:
    import yaml
except ImportError:  # pragma: no cover - PyYAML comes with shedshare-cli
    yaml = None


def load_spec(filename: str) -> dict[str, Any]:
    path = Path(filename)
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None
    if path.suffix.lower() == ".json" or yaml is None:
        if path.suffix.lower() in (".yaml", ".yml"):
            raise click.ClickException(f"{path}: YAML job files need PyYAML (pip install shedshare-cli); use JSON")
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise click.ClickException(f"{path}: not valid JSON: {exc}") from None
    else:
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise click.ClickException(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(spec, dict):
        raise click.ClickException(f"{path}: a job file is a mapping of field: value, e.g. image: ghcr.io/acme/train:1")
    return spec


def parse_overrides(overrides) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs as fields, each VALUE read as YAML (as JSON without PyYAML; a
    string when it is neither)."""
    fields = {}
    for override in overrides:
        field, sep, text = override.partition("=")
        if not sep or not field.strip():
            raise click.ClickException(f"--set {override!r}: write FIELD=VALUE, e.g. gpu_count=2")
        fields[field.strip()] = _value(text)
    return fields


def _value(text: str) -> Any:
    if yaml is not None:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        return text if value is None and text else value
    try:
        return json.loads(text)
    except ValueError:
        return text
