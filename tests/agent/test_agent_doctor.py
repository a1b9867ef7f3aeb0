import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from types import SimpleNamespace

import httpx
import pytest
from click.testing import CliRunner

from nodes.agent import config, doctor, gpus
from nodes.agent.cli import main
from nodes.agent.doctor import Check
from nodes.agent.fake_nvml import FakeDevice, FakeNvml
from tests.agent.fakes import CREDENTIAL, UNIT_ID, FakeServer, serving

NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens there


def enrolled(tmp_path, url: str = NOWHERE):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"url": url, "unit_id": UNIT_ID, "credential": CREDENTIAL}))
    return path


def doctor_cli(tmp_path, *args: str):
    config_path = tmp_path / "agent.json"
    return CliRunner().invoke(main, ["doctor", "--config", str(config_path), *args])


def check_line(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.split()[1:2] == [name])


@pytest.fixture
def one_sick_gpu(monkeypatch):
    """A real-looking machine (no --simulate) whose second GPU has uncorrected ECC errors."""
    devices = [
        FakeDevice(name="NVIDIA H100 80GB HBM3", uuid="GPU-0", memory_mb=81559),
        FakeDevice(name="NVIDIA H100 80GB HBM3", uuid="GPU-1", memory_mb=81559, ecc_uncorrected=3),
    ]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(devices))


def test_doctor_prints_a_simulated_inventory_and_passes_before_enrolment(tmp_path):
    result = doctor_cli(tmp_path, "--simulate", "8xH100-80GB")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "GPU inventory (simulated 8xH100-80GB):"
    assert lines[1].split() == ["GPU", "MODEL", "VRAM", "TEMP", "POWER/LIMIT", "UTIL", "MIG", "HEALTH"]
    assert lines[2].split() == ["0", "H100", "80.0", "GiB", "34", "C", "71/700", "W", "0%", "off", "ok"]
    assert [line.split()[0] for line in lines[2:10]] == [str(i) for i in range(8)]
    assert "simulated (8xH100-80GB): driver 570.133.20, CUDA 12.8" in check_line(result.output, "driver")
    assert check_line(result.output, "gpus").split()[0] == "ok"
    assert check_line(result.output, "server").split()[:3] == ["skip", "server", "not"]
    assert lines[-1] == "Verdict: ready"


def test_doctor_shows_each_gpus_mig_layout(tmp_path):
    result = doctor_cli(tmp_path, "--simulate", "2xH100:mig=1g.10gb*3+3g.40gb")

    assert result.exit_code == 0, result.output
    assert result.output.count("1g.10gb*3+3g.40gb  ok") == 2


def test_doctor_fails_on_an_unhealthy_gpu_and_says_why(tmp_path, one_sick_gpu):
    result = doctor_cli(tmp_path)

    assert result.exit_code == 1
    assert "GPU inventory (NVML):" in result.output
    assert "UNHEALTHY: 3 uncorrected ECC errors" in result.output
    assert check_line(result.output, "gpus").split() == [
        "FAIL",
        "gpus",
        "GPU",
        "1:",
        "3",
        "uncorrected",
        "ECC",
        "errors",
    ]
    assert result.output.splitlines()[-1] == "Verdict: FAILED (gpus)"


def test_doctor_fails_without_nvml_and_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)

    result = doctor_cli(tmp_path)

    assert result.exit_code == 1
    assert "nvidia-ml-py is not installed" in check_line(result.output, "driver")
    assert check_line(result.output, "gpus").split()[:2] == ["skip", "gpus"]
    assert "Traceback" not in result.output


def test_doctor_checks_an_enrolled_units_server_and_clock(tmp_path):
    with serving(FakeServer()) as url:
        enrolled(tmp_path, url)
        result = doctor_cli(tmp_path, "--simulate", "1xB200")

    assert result.exit_code == 0, result.output
    assert check_line(result.output, "server").split() == ["ok", "server", url, "answers"]
    assert check_line(result.output, "clock").split()[:3] == ["ok", "clock", "within"]


def test_doctor_fails_when_the_enrolled_units_server_does_not_answer(tmp_path):
    enrolled(tmp_path)

    result = doctor_cli(tmp_path, "--simulate", "1xB200")

    assert result.exit_code == 1
    assert "GET http://127.0.0.1:9/api/schema/: ConnectError" in check_line(result.output, "server")
    assert check_line(result.output, "clock").split()[:2] == ["skip", "clock"]
    assert result.output.splitlines()[-1] == "Verdict: FAILED (server)"


@pytest.mark.parametrize(
    ("engine_error", "status", "detail"),
    [
        (None, "ok", "docker: the engine answers"),
        ("socket not found", "FAIL", "docker: no Docker engine: socket not found"),
    ],
)
def test_doctor_asks_the_docker_engine_when_the_runtime_is_docker(tmp_path, monkeypatch, engine_error, status, detail):
    class DockerException(Exception):
        pass

    class Engine:
        def info(self) -> dict:
            if engine_error:
                raise DockerException(engine_error)
            return {"Runtimes": {"runc": {}}}

    docker = SimpleNamespace(
        from_env=lambda **options: Engine(), errors=SimpleNamespace(DockerException=DockerException)
    )
    monkeypatch.setitem(sys.modules, "docker", docker)

    result = doctor_cli(tmp_path, "--simulate", "1xH100", "--runtime", "docker")

    assert check_line(result.output, "runtime").split()[0] == status
    assert detail in result.output
    assert result.exit_code == (status == "FAIL")


def test_the_clock_is_sane_within_a_minute_of_the_servers():
    server_time = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)

    assert doctor.clock_check(server_time, server_time.timestamp() + 59).status == "ok"
    late = doctor.clock_check(server_time, server_time.timestamp() - 61)
    assert late == Check("clock", "FAIL", "this clock is -61 s off the server's (at most 60 s allowed); check NTP")
    assert doctor.clock_check(None, 0).status == "skip"


def test_the_clock_check_reads_the_servers_date_header(tmp_path):
    server_time = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    headers = {"Date": format_datetime(server_time, usegmt=True)}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}, headers=headers))
    cfg = config.load(enrolled(tmp_path))

    checks = doctor.server_checks(cfg, required=True, transport=transport, now=lambda: server_time.timestamp() + 300)

    assert [(c.name, c.status) for c in checks] == [("server", "ok"), ("clock", "FAIL")]


def test_run_only_warns_about_an_unreachable_server(tmp_path):
    cfg = config.load(enrolled(tmp_path))

    checks = doctor.preflight(cfg, [gpus.simulate("1xH100", UNIT_ID)[0]])

    assert [(c.name, c.status) for c in checks] == [
        ("gpus", "ok"), ("country", "warn"), ("server", "warn"), ("clock", "skip")
    ]  # fmt: skip
    assert doctor.passed(checks)


def test_doctor_warns_when_no_country_is_configured(tmp_path):
    result = doctor_cli(tmp_path, "--simulate", "1xH100-80GB")

    line = check_line(result.output, "country")
    assert line.split()[0] == "warn"
    assert "no country configured" in line
    assert result.exit_code == 0  # a warning: the unit still runs jobs without residency rules


def test_doctor_names_the_configured_country(tmp_path):
    path = enrolled(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "country": "DE"}))

    checks = doctor.preflight(config.load(path), [gpus.simulate("1xH100", UNIT_ID)[0]])

    assert next(c for c in checks if c.name == "country") == Check(
        "country", "ok", "DE, reported to the server with each heartbeat"
    )


def test_run_refuses_to_start_on_a_failed_self_test(tmp_path, one_sick_gpu):
    config_path = enrolled(tmp_path)

    result = CliRunner().invoke(main, ["run", "--config", str(config_path), "--state-dir", str(tmp_path / "state")])

    assert result.exit_code == 1
    assert "refusing to start, the self-test failed:" in result.output
    assert "GPU 1: 3 uncorrected ECC errors" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "state" / "status.json").exists()


def test_run_starts_and_keeps_trying_while_the_server_is_down(tmp_path):
    log = tmp_path / "agent.log"
    args = ["run", "--config", str(enrolled(tmp_path)), "--simulate", "2xH100-80GB"]
    with open(log, "w") as stderr:
        agent = subprocess.Popen([sys.executable, "-m", "nodes.agent", *args], stderr=stderr)
    try:
        deadline = time.monotonic() + 15
        while "event=heartbeat_failed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=15)
    finally:
        agent.kill()

    logs = log.read_text()
    assert agent.returncode == 0, logs
    assert "check=server status=warn" in logs
    assert "event=heartbeat_failed" in logs
