"""`shedshare-agent`: enrol a unit once, then run the agent loop."""

import logging
import signal
import socket
from pathlib import Path
from types import FrameType

import click

from nodes.agent import __version__, config, gpus, logs
from nodes.agent.cli_inspect import doctor_command, refuse_on_failed_self_test, status_command
from nodes.agent.client import AgentClient, AgentError
from nodes.agent.isolation import COUNTRY, RUNTIMES
from nodes.agent.loop import Agent, Options
from nodes.agent.refusal import policy_for
from nodes.agent.runtime import RuntimeUnavailable
from nodes.agent.runtime.factory import runtime_for
from nodes.agent.status import FILENAME as STATUS_FILE
from nodes.agent.stream import Stream

CONFIG_HELP = "Config file [default: $SHEDSHARE_AGENT_CONFIG or ~/.config/shedshare/agent.json]."
logger = logging.getLogger(__name__)
COUNTRY_HELP = "Where this unit stands (ISO 3166-1 alpha-2, e.g. DE); jobs restricted elsewhere are refused."


@click.group()
@click.version_option(__version__, prog_name="shedshare-agent")
def main() -> None:
    """Shedshare node agent."""


@main.command()
@click.option("--url", required=True, help="Server base URL, e.g. https://shedshare.example.")
@click.option("--token", required=True, help="One-time enrolment token from the owner portal.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--hostname", default=socket.gethostname, show_default="this host's name")
@click.option("--country", callback=lambda ctx, param, value: _country_code(value), help=COUNTRY_HELP)
def enrol(url: str, token: str, config_path: Path | None, hostname: str, country: str | None) -> None:
    """Exchange an enrolment token for this unit's credential and save it."""
    path = config_path or config.default_path()
    try:
        with AgentClient(url) as client:
            enrolment = client.enrol(token=token, hostname=hostname)
        config.save_enrolment(
            path, url=url, unit_id=enrolment.unit_id, credential=enrolment.credential, country=country
        )
    except (AgentError, OSError) as exc:
        raise click.ClickException(f"enrolment failed: {exc}") from None
    click.echo(f"Enrolled unit {enrolment.unit_id} with {url}; config saved to {path}")


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--simulate", help="Simulated GPUs instead of NVML, e.g. 8xH100-80GB.")
@click.option("--work-dir", type=click.Path(path_type=Path), help="Jobs' working directories.")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Job logs and agent state.")
@click.option(
    "--usage-interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between usage samples of a running job.",
)
@click.option("--max-jobs", type=click.IntRange(min=1), help="Exit after this many jobs.")
@click.option(
    "--drain",
    type=click.Choice(config.DRAIN_POLICIES),
    help="On SIGTERM, wait for running jobs or stop them (SIGTERM, reported as drained) [default: config, else wait].",
)
@click.option("--runtime", type=click.Choice(RUNTIMES), help="How jobs run [default: config, else process].")
@click.option("--dev-runtime", is_flag=True, default=None, help="Let the process runtime take work it cannot isolate.")
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Hold a stream to the server (work pushed at once), falling back to HTTP polling; "
    "--no-stream polls only [default: config, else stream].",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def run(
    config_path: Path | None,
    simulate: str | None,
    work_dir: Path | None,
    state_dir: Path | None,
    usage_interval: float,
    max_jobs: int | None,
    drain: str | None,
    runtime: str | None,
    dev_runtime: bool | None,
    stream: bool | None,
    log_level: str,
) -> None:
    """Heartbeat, pull assignments and run them until SIGTERM/SIGINT, then drain."""
    logs.setup(log_level.upper())
    try:
        cfg = config.load(
            config_path or config.default_path(),
            simulate=simulate,
            work_dir=work_dir,
            state_dir=state_dir,
            drain=drain,
            stream=stream,
            runtime=runtime,
            allow_unisolated_dev_runtime=dev_runtime,
        )
        source = gpus.simulated_inventory(cfg.simulate, cfg.unit_id) if cfg.simulate else gpus.nvml_inventory()
        inventory = source.read()
        for problem in config.keep_private(config_path or config.default_path(), cfg):
            logs.event(logger, "not_private", logging.WARNING, error=problem)
        cfg.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        job_runtime = runtime_for(cfg)
    except (config.ConfigError, gpus.InventoryError, RuntimeUnavailable, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    refuse_on_failed_self_test(cfg, inventory)
    options = Options(usage_interval_s=usage_interval, max_jobs=max_jobs, drain=cfg.drain)
    policy = policy_for(cfg.isolation, inventory, cfg.images)
    connection = Stream(cfg.url, cfg.credential).start() if cfg.stream else None
    with AgentClient(cfg.url, cfg.credential, stream=connection) as client:
        agent = Agent(
            client,
            job_runtime,
            inventory,
            options,
            policy=policy,
            status_path=cfg.state_dir / STATUS_FILE,
            state_dir=cfg.state_dir,
            inventory=source,
            data=cfg.data,
        )
        _install_signal_handlers(agent)
        raise SystemExit(agent.run())


main.add_command(doctor_command)
main.add_command(status_command)


def _country_code(value: str | None) -> str | None:
    code = value.strip().upper() if value else None
    if code is not None and not COUNTRY.fullmatch(code):
        raise click.BadParameter("expected an ISO 3166-1 alpha-2 code such as DE")
    return code


def _install_signal_handlers(agent: Agent) -> None:
    """First SIGTERM/SIGINT drains; a second one kills the running jobs, then drains."""
    signals_seen = 0

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        agent.stop(force=signals_seen > 1)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


if __name__ == "__main__":
    main(prog_name="shedshare-agent")
