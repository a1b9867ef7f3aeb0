import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from nodes.agent.cli import main
from tests.agent.fakes import CREDENTIAL, UNIT_ID, FakeServer, serving
from tests.conftest import child_environ


@pytest.fixture
def base_url(server: FakeServer):
    with serving(server) as url:
        yield url


def agent_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "nodes.agent.cli", *args]


def test_enrol_saves_the_credential_and_says_so(base_url, tmp_path):
    config = tmp_path / "shedshare" / "agent.json"

    result = CliRunner().invoke(main, ["enrol", "--url", base_url, "--token", "t", "--config", str(config)])

    assert result.exit_code == 0, result.output
    assert f"Enrolled unit {UNIT_ID}" in result.output
    assert json.loads(config.read_text()) == {"url": base_url, "unit_id": UNIT_ID, "credential": CREDENTIAL}


def test_a_refused_enrolment_explains_itself_without_a_traceback(server, base_url, tmp_path):
    server.refuse_enrolment = True
    config = tmp_path / "agent.json"

    result = CliRunner().invoke(main, ["enrol", "--url", base_url, "--token", "t", "--config", str(config)])

    assert result.exit_code == 1
    assert "enrolment failed: POST /enrol: 400 The enrolment token is invalid" in result.output
    assert "Traceback" not in result.output
    assert not config.exists()


def test_an_unreachable_server_fails_enrolment_readably(tmp_path):
    args = ["enrol", "--url", "http://127.0.0.1:9", "--token", "t", "--config", str(tmp_path / "a.json")]

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 1
    assert "enrolment failed: POST /enrol: ConnectError" in result.output


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [([], "not enrolled"), (["--simulate", "8xFOO"], "bad simulated inventory")],
)
def test_run_refuses_readably_without_enrolment_or_with_a_bad_inventory(tmp_path, extra, complaint):
    config = tmp_path / "agent.json"
    if extra:
        config.write_text(json.dumps({"url": "http://x", "unit_id": UNIT_ID, "credential": "c"}))

    result = CliRunner().invoke(main, ["run", "--config", str(config), *extra])

    assert result.exit_code == 1
    assert complaint in result.output
    assert "Traceback" not in result.output


def test_the_agent_imports_nothing_from_django_or_the_server():
    code = (
        "import sys, nodes.agent.cli, nodes.agent.loop, nodes.agent.runtime.process\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('django', 'rest_framework', 'marketplace', 'billing', 'celery')]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in child_environ().items() if k != "DJANGO_SETTINGS_MODULE"}

    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_the_agent_process_drains_its_job_on_sigterm_and_exits_cleanly(server, base_url, tmp_path):
    config = str(tmp_path / "agent.json")
    enrol = ["enrol", "--url", base_url, "--token", "t", "--config", config, "--country", "DE"]
    subprocess.run(agent_argv(*enrol), check=True)
    first = server.assign(["sh", "-c", "sleep 1.5; exit 5"], gpu_count=2)
    args = ["run", "--config", config, "--simulate", "4xH100-80GB", "--usage-interval", "0.3",
            "--work-dir", str(tmp_path / "work"), "--dev-runtime"]  # fmt: skip
    agent = subprocess.Popen(agent_argv(*args), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        server.assign(["true"], gpu_count=1)
        agent.send_signal(signal.SIGTERM)
        _, logs = agent.communicate(timeout=15)
    finally:
        agent.kill()

    assert agent.returncode == 0, logs
    assert server.started == [first]
    assert server.finished[first] == {"exit_code": 5, "reason": "exited"}
    assert len(server.queue) == 1
    assert "event=draining" in logs and "event=job_finished" in logs
    assert CREDENTIAL not in logs


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "nodes.agent", "--version"], capture_output=True, text=True, check=True
    )

    assert "shedshare-agent, version 0.1.0" in result.stdout
