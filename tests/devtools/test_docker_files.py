"""There is no Docker engine here, so check what can be checked: every command the images and
the compose file run exists in the project, with the options they pass."""

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from django.core.management import get_commands, load_command_class
from django.utils.module_loading import import_string

from nodes.agent.cli import main as agent_cli

DOCKER = Path(__file__).resolve().parents[2] / "docker"
TEXT = "\n".join(path.read_text() for path in sorted(DOCKER.iterdir()) if path.is_file())


def test_the_images_carry_no_development_tools_or_tests():
    # The server image runs from its copy of the source, so what the build context leaves out is
    # what the image cannot import: the benchmarks, the demo runner and the Stripe fake (tests/).
    ignored = set((DOCKER.parent / ".dockerignore").read_text().split())
    assert {"marketplace/devtools", "tests", ".venv*", ".data"} <= ignored


def test_the_docker_folder_has_both_images_and_a_compose_file():
    assert {"Dockerfile", "agent.Dockerfile", "compose.yaml"} <= {p.name for p in DOCKER.iterdir()}


@pytest.mark.parametrize("command", sorted(set(re.findall(r'manage\.py(?:",)?[ \t]+"?(\w+)', TEXT))))
def test_every_management_command_used_exists(command):
    assert command in get_commands(), f"docker/ runs manage.py {command}, which does not exist"


def test_the_unit_token_options_used_in_compose_exist():
    parser = load_command_class("nodes", "unit_token").create_parser("manage.py", "unit_token")
    parsed = parser.parse_args(["--owner", "o", "--unit", "u", "--country", "DE"])
    assert (parsed.owner, parsed.unit, parsed.country) == ("o", "u", "DE")


def test_the_web_server_serves_the_asgi_application_with_uvicorn_workers():
    # Long polls wait in the event loop; a threaded WSGI worker would hold a thread per wait.
    [(target, worker)] = re.findall(r'"gunicorn", "(\w+\.asgi):application".*"--worker-class", "([\w.]+)"', TEXT)
    module = __import__(target, fromlist=["application"])
    assert callable(module.application)
    from uvicorn_worker import UvicornWorker

    worker_class = import_string(worker)
    assert issubclass(worker_class, UvicornWorker)
    # The agents' streams: the sans-I/O WebSocket implementation, and no server pings.
    assert worker_class.CONFIG_KWARGS["ws"] == "websockets-sansio"
    assert worker_class.CONFIG_KWARGS["ws_ping_interval"] is None


@pytest.mark.parametrize("role", sorted(set(re.findall(r"celery\W+-A\W+marketplace\.celery\W+(\w+)", TEXT))))
def test_the_celery_app_and_roles_exist(role):
    from marketplace.celery import app

    assert role in {"worker", "beat"}
    assert app.main == "shedshare"


@pytest.mark.parametrize("usage", sorted(set(re.findall(r"shedshare-agent ([a-z]+(?: --[a-z-]+)*)", TEXT))))
def test_every_agent_subcommand_and_option_used_exists(usage):
    subcommand, *options = usage.split(" ")
    result = CliRunner().invoke(agent_cli, [subcommand, "--help"])
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output


def test_the_compose_shed_runs_renters_jobs_in_containers_never_as_processes_of_the_agent():
    agent = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["agent"]
    command = " ".join(agent["command"])

    assert "--runtime docker" in command and "--dev-runtime" not in command
    assert "/var/run/docker.sock:/var/run/docker.sock" in agent["volumes"]
    assert "SHEDSHARE_AGENT_RUNTIME=docker" in (DOCKER / "agent.Dockerfile").read_text()


def test_the_long_running_services_are_started_again_when_they_die():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]

    assert {name: services[name].get("restart") for name in ("web", "worker", "beat")} == dict.fromkeys(
        ("web", "worker", "beat"), "unless-stopped"
    )
    assert services["migrate"].get("restart") in (None, "no")  # a one-off: not run again and again
