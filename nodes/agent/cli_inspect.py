"""`shedshare-agent doctor` and `status`: questions an owner asks a machine, with or without a running agent."""

import json
import time
from pathlib import Path

import click

from nodes.agent import config, doctor, render, status
from nodes.agent.config import AgentConfig
from nodes.agent.gpus import Gpu
from nodes.agent.isolation import RUNTIMES, IsolationConfig

CONFIG_HELP = "Config file [default: $SHEDSHARE_AGENT_CONFIG or ~/.config/shedshare/agent.json]."


@click.command("doctor")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--simulate", help="Check a simulated inventory instead of NVML, e.g. 8xH100-80GB.")
@click.option("--runtime", type=click.Choice(RUNTIMES), help="Runtime to check [default: config, else process].")
def doctor_command(config_path: Path | None, simulate: str | None, runtime: str | None) -> None:
    """Show the GPU inventory and a self-test; exit 1 if any check fails."""
    cfg = _config_if_enrolled(config_path or config.default_path(), simulate=simulate, runtime=runtime)
    isolation = cfg.isolation if cfg else IsolationConfig(runtime=runtime or "process")
    simulate = cfg.simulate if cfg else simulate
    found, checks = doctor.examine(cfg, simulate, isolation)
    source = f"simulated {simulate}" if simulate else "NVML"
    click.echo(f"GPU inventory ({source}):\n{render.inventory([gpu.as_report() for gpu in found])}\n")
    click.echo(f"Self-test:\n{render.checks(checks)}\n{render.verdict(checks)}")
    if not doctor.passed(checks):
        raise SystemExit(1)


@click.command("status")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--state-dir", type=click.Path(path_type=Path), help="The running agent's state dir [default: config].")
@click.option("--json", "as_json", is_flag=True, help="Print the status file as JSON, plus `running`.")
def status_command(config_path: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Show what the running agent runs, the limits in force and its last heartbeat; exit 1 if it is not running."""
    try:
        cfg = config.load(config_path or config.default_path(), state_dir=state_dir)
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    data = status.read(cfg.state_dir)
    if data is None:
        raise click.ClickException(f"no agent status in {cfg.state_dir}: the agent has not run with this config yet")
    alive = isinstance(data.get("pid"), int) and status.pid_alive(data["pid"])
    if as_json:
        click.echo(json.dumps(data | {"running": alive}, indent=2))
    else:
        click.echo(render.status(data, alive=alive, now=time.time()))
    if not alive:
        raise SystemExit(1)


def refuse_on_failed_self_test(cfg: AgentConfig, inventory: list[Gpu]) -> None:
    """`run` calls this once it has its inventory and runtime."""
    checks = doctor.preflight(cfg, inventory)
    if not doctor.passed(checks):
        raise click.ClickException(f"refusing to start, the self-test failed:\n{render.checks(checks)}")


def _config_if_enrolled(path: Path, **overrides: str | None) -> AgentConfig | None:
    if not path.exists():
        return None
    try:
        return config.load(path, **overrides)
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
