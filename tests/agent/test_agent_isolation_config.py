import json
import re

import pytest
from click.testing import CliRunner

from nodes.agent import config
from nodes.agent.cli import main
from nodes.agent.config import ConfigError
from nodes.agent.isolation import KEYS, IsolationConfig
from tests.agent.fakes import UNIT_ID, serving


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in KEYS:
        monkeypatch.delenv(f"SHEDSHARE_AGENT_{key.upper()}", raising=False)


def enrolled(tmp_path, **extra):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"url": "http://x", "unit_id": UNIT_ID, "credential": "c", **extra}))
    return path


def test_an_agent_without_isolation_keys_runs_nothing_it_cannot_isolate(tmp_path):
    assert config.load(enrolled(tmp_path)).isolation == IsolationConfig()
    assert IsolationConfig().runtime == "process" and not IsolationConfig().allow_unisolated_dev_runtime
    assert IsolationConfig().country is None


def test_isolation_keys_come_from_the_file_the_environment_and_the_command_line(tmp_path, monkeypatch):
    path = enrolled(tmp_path, country="fr", isolation_levels=["gpu", "node"], scratch_mb=1024)
    monkeypatch.setenv("SHEDSHARE_AGENT_SANDBOX_RUNTIME", "runsc")
    monkeypatch.setenv("SHEDSHARE_AGENT_COUNTRY", "DE")
    monkeypatch.setenv("SHEDSHARE_AGENT_CPUS_PER_GPU", "2.5")

    cfg = config.load(path, runtime="docker", allow_unisolated_dev_runtime=None).isolation

    assert (cfg.country, cfg.runtime, cfg.sandbox_runtime) == ("DE", "docker", "runsc")
    assert cfg.isolation_levels == ("gpu", "node")
    assert (cfg.scratch_mb, cfg.cpus_per_gpu) == (1024, 2.5)


def test_levels_and_flags_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SHEDSHARE_AGENT_ISOLATION_LEVELS", "node, shared")
    monkeypatch.setenv("SHEDSHARE_AGENT_ALLOW_UNISOLATED_DEV_RUNTIME", "yes")

    cfg = config.load(enrolled(tmp_path)).isolation

    assert cfg.isolation_levels == ("shared", "node")
    assert cfg.allow_unisolated_dev_runtime is True


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("country", "Germany", "country: 'Germany' is not an ISO 3166-1 alpha-2 code"),
        ("runtime", "podman", "runtime: 'podman' is not one of process, docker"),
        ("isolation_levels", ["gpu", "vm"], "unknown isolation levels ['vm']"),
        ("allow_unisolated_dev_runtime", "maybe", "is not true or false"),
        ("memory_mb_per_gpu", 0, "must be positive"),
    ],
)
def test_a_bad_isolation_key_is_a_readable_config_error(tmp_path, key, value, complaint):
    with pytest.raises(ConfigError, match=re.escape(complaint)):
        config.load(enrolled(tmp_path, **{key: value}))


def test_enrol_records_the_units_country(server, tmp_path):
    path = tmp_path / "agent.json"
    with serving(server) as url:
        args = ["enrol", "--url", url, "--token", "t", "--config", str(path), "--country", "de"]
        result = CliRunner().invoke(main, args)

    assert result.exit_code == 0, result.output
    assert json.loads(path.read_text())["country"] == "DE"
    assert config.load(path).isolation.country == "DE"


def test_enrol_refuses_a_country_that_is_not_a_code(tmp_path):
    args = ["enrol", "--url", "http://127.0.0.1:9", "--token", "t", "--config", str(tmp_path / "a.json")]

    result = CliRunner().invoke(main, [*args, "--country", "Germany"])

    assert result.exit_code == 2
    assert "ISO 3166-1 alpha-2" in result.output


def test_run_with_the_docker_runtime_and_no_engine_explains_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    args = ["run", "--config", str(enrolled(tmp_path)), "--simulate", "2xH100-80GB", "--runtime", "docker"]

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 1
    assert "no Docker engine" in result.output
    assert "Traceback" not in result.output
