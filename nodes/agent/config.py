"""Agent configuration: a JSON file written by `enrol`, overridden by environment variables.

Keys: url, unit_id, credential (written by enrol) and optionally simulate, work_dir, state_dir and
the isolation keys of `isolation.IsolationConfig` (country, runtime, limits…), the image keys of
`images.ImagePolicy` (registries, registry_mirrors, image_max_mb…) and the data keys of
`staging.DataPolicy` (scratch_max_mb, data_private_hosts).
Each key can be overridden by SHEDSHARE_AGENT_<KEY>; command-line options override both.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.agent import images, isolation, staging
from nodes.agent.images import ImagePolicy
from nodes.agent.isolation import IsolationConfig
from nodes.agent.staging import DataPolicy

REQUIRED = ("url", "unit_id", "credential")
OPTIONAL = ("simulate", "work_dir", "state_dir", "drain", "stream", *isolation.KEYS, *images.KEYS, *staging.KEYS)
DRAIN_POLICIES = ("wait", "stop")  # what SIGTERM does to running jobs: wait for them, or stop them
ENV_PREFIX = "SHEDSHARE_AGENT_"


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class AgentConfig:
    url: str
    unit_id: str
    credential: str = field(repr=False)
    state_dir: Path
    work_dir: Path
    simulate: str | None = None
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
    drain: str = "wait"
    images: ImagePolicy = field(default_factory=ImagePolicy)
    # Hold a stream to the server (pushed work, cheap heartbeats); false: HTTP polling only.
    stream: bool = True
    data: DataPolicy = field(default_factory=DataPolicy)


def default_path() -> Path:
    env = os.environ.get(f"{ENV_PREFIX}CONFIG")
    return Path(env).expanduser() if env else Path.home() / ".config" / "shedshare" / "agent.json"


def _section(build, parsers: dict[str, Any], values: dict[str, Any]):
    """One section of the config (isolation, images) from the keys present in ``values``, each
    through its parser; ValueError names the bad key."""
    parsed: dict[str, Any] = {}
    for key, parse in parsers.items():
        if values.get(key) is not None:
            try:
                parsed[key] = parse(values[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{key}: {exc}") from None
    return build(**parsed)


def load(path: Path, **overrides: Any) -> AgentConfig:
    """Read the config file, apply environment and explicit overrides (None = not given)."""
    values = _read(path)
    values.update(_from_env())
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [key for key in REQUIRED if not values.get(key)]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}; enrol again")
    try:
        isolation_config = _section(IsolationConfig, isolation.PARSERS, values)
        image_policy = _section(ImagePolicy, images.PARSERS, values)
        data_policy = _section(DataPolicy, staging.PARSERS, values)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if isolation_config.sandbox_all_jobs and not isolation_config.sandbox_runtime:
        raise ConfigError(f"{path}: sandbox_all_jobs needs a sandbox_runtime such as runsc")
    drain = str(values.get("drain") or "wait")
    if drain not in DRAIN_POLICIES:
        raise ConfigError(f"{path}: drain must be one of {', '.join(DRAIN_POLICIES)}, not {drain!r}")
    stream = values.get("stream", True)
    if isinstance(stream, str):
        if stream.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{path}: stream must be true or false, not {stream!r}")
        stream = stream.lower() in ("true", "1", "yes")
    if not isinstance(stream, bool):
        raise ConfigError(f"{path}: stream must be true or false, not {stream!r}")
    # State lives next to the config by default so that one config file means one agent.
    state_dir = Path(values.get("state_dir") or path.parent / "state").expanduser()
    return AgentConfig(
        url=str(values["url"]).rstrip("/"),
        unit_id=str(values["unit_id"]),
        credential=str(values["credential"]),
        state_dir=state_dir,
        work_dir=Path(values.get("work_dir") or state_dir / "work").expanduser(),
        simulate=values.get("simulate") or None,
        isolation=isolation_config,
        drain=drain,
        images=image_policy,
        stream=stream,
        data=data_policy,
    )


def save_enrolment(path: Path, *, url: str, unit_id: str, credential: str, country: str | None = None) -> None:
    """Write the enrolment atomically, readable by the owner only: it holds a credential."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above only applies when the file is new
    with os.fdopen(fd, "w") as f:
        enrolment = {"url": url.rstrip("/"), "unit_id": unit_id, "credential": credential}
        json.dump(enrolment | ({"country": country} if country else {}), f)
        f.write("\n")
    os.replace(tmp, path)


def keep_private(path: Path, cfg: AgentConfig) -> list[str]:
    """Make the config file (it holds the unit's credential) and the state dir readable by the
    agent's user only, whatever they were created with: jobs of the process runtime run as
    another user. Returns what could not be tightened (a read-only /etc, say), for a warning."""
    problems = []
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        problems.append(f"{cfg.state_dir}: {exc}")
    for target, mode in ((path, 0o600), (cfg.state_dir, 0o700)):
        try:
            if target.stat().st_mode & 0o777 != mode:
                os.chmod(target, mode)
        except OSError as exc:
            problems.append(f"{target}: {exc}")
    return problems


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"not enrolled: {path} does not exist; run `shedshare-agent enrol --url URL --token TOKEN`"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _from_env() -> dict[str, str]:
    found = {key: os.environ.get(ENV_PREFIX + key.upper()) for key in REQUIRED + OPTIONAL}
    return {key: value for key, value in found.items() if value}
