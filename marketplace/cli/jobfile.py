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
