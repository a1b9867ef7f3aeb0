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
from nodes.agent.isolation import IsolationConfig
from nodes.agent.runtime import RuntimeUnavailable
from tests.agent.fakes import CREDENTIAL, UNIT_ID, FakeServer, serving

NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens there
DOCKER = IsolationConfig(runtime="docker", allow_egress=False)
CVES = ("CVE-2024-0132", "CVE-2025-23359", "CVE-2025-23266")


class Engine:
    """The Docker engine as `doctor` asks it."""

    def __init__(self, runtimes: tuple[str, ...] = ("runc",), cpus: int | None = 2) -> None:
        self.runtimes = runtimes
        self.cpus = cpus

    def info(self) -> dict:
        return {"Runtimes": {name: {} for name in self.runtimes}, "NCPU": self.cpus}


def toolkit(answers: dict[str, str]):
    """A runner on which each tool named prints its answer to --version; the others are not installed."""

    def run(argv):
        if argv[0] in answers:
            return subprocess.CompletedProcess(argv, 0, answers[argv[0]], "")
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: not installed")

    return run


NO_TOOLKIT = toolkit({})


def docker_checks(isolation: IsolationConfig = DOCKER, engine: Engine | None = None, **options) -> dict[str, Check]:
    options = {"simulated": True, "run": NO_TOOLKIT, **options}
    checks = doctor.runtime_checks(isolation, client=engine or Engine(), **options)
    return {check.name: check for check in checks}


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
    monkeypatch.setattr(doctor, "egress_guard", lambda client, isolation: SimpleNamespace(bridge="shs-egress0"))

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
    assert check_line(result.output, "toolkit").split()[0] == "skip"  # simulated GPUs
    assert result.exit_code == (status == "FAIL")


def test_doctor_checks_the_engine_cpus_egress_and_toolkit_after_the_runtime(one_sick_gpu):
    run = toolkit({"nvidia-ctk": "NVIDIA Container Toolkit CLI version 1.17.8\ncommit: abc"})

    _, checks = doctor.examine(None, None, DOCKER, client=Engine(), run=run)

    assert [(check.name, check.status) for check in checks] == [
        ("driver", "ok"), ("gpus", "FAIL"), ("runtime", "ok"), ("cpus", "ok"), ("egress", "ok"), ("toolkit", "ok"),
        ("country", "warn"), ("server", "skip"), ("clock", "skip"),
    ]  # fmt: skip


def test_the_engine_lists_its_runtimes():
    check = docker_checks(engine=Engine(runtimes=("runc", "runsc")))["runtime"]

    assert check == Check(
        "runtime",
        "ok",
        "docker: the engine answers, with runtimes runc, runsc; no sandbox runtime: jobs asking for a sandbox are "
        "refused",
    )


@pytest.mark.parametrize(
    ("all_jobs", "rule"),
    [(False, "jobs asking for a sandbox run under runsc"), (True, "every job runs under runsc (sandbox_all_jobs)")],
)
def test_the_sandbox_runtime_is_registered_with_the_engine(all_jobs, rule):
    isolation = IsolationConfig(
        runtime="docker", allow_egress=False, sandbox_runtime="runsc", sandbox_all_jobs=all_jobs
    )

    check = docker_checks(isolation, Engine(runtimes=("runc", "runsc")))["runtime"]

    assert check.status == "ok"
    assert check.detail.endswith(f"; {rule}")


def test_a_sandbox_runtime_the_engine_lacks_fails():
    isolation = IsolationConfig(runtime="docker", allow_egress=False, sandbox_runtime="runsc", sandbox_all_jobs=True)

    check = docker_checks(isolation, Engine(runtimes=("runc",)))["runtime"]

    assert check == Check("runtime", "FAIL", "docker: the engine has no 'runsc' runtime (it has runc)")


@pytest.mark.parametrize(
    ("cpus", "detail"),
    [
        (2, "2 CPUs; cpus_per_gpu 4 is clamped to 2: a job gets at most the machine's CPUs"),
        (64, "64 CPUs: a job gets 4 per GPU, at most 64"),
        (None, "the engine does not say how many CPUs it has: a job gets 4 per GPU"),
    ],
)
def test_doctor_says_how_many_cpus_a_job_gets(cpus, detail):
    assert docker_checks(engine=Engine(cpus=cpus))["cpus"] == Check("cpus", "ok", detail)


def test_without_egress_no_rule_is_needed(monkeypatch):
    monkeypatch.setattr(doctor, "egress_guard", lambda client, isolation: pytest.fail("no egress, no rules"))

    assert docker_checks()["egress"] == Check("egress", "ok", "egress off: no job reaches the network")


def test_egress_is_checked_with_its_rules_in_place(monkeypatch):
    engine, asked = Engine(), []

    def guard(client, isolation):
        asked.append((client, isolation))
        return SimpleNamespace(bridge="shs-egress0")

    monkeypatch.setattr(doctor, "egress_guard", guard)
    isolation = IsolationConfig(runtime="docker", allow_egress=True)

    check = docker_checks(isolation, engine)["egress"]

    assert check.status == "ok"
    assert "through shs-egress0, never the host or a private network" in check.detail
    assert asked == [(engine, isolation)]


def test_egress_whose_rules_cannot_be_kept_fails_with_the_problems(monkeypatch):
    problems = "egress cannot be kept off the host and private networks: iptables -F SHEDSHARE-EGRESS: not installed"

    def guard(client, isolation):
        raise RuntimeUnavailable(problems)

    monkeypatch.setattr(doctor, "egress_guard", guard)

    check = docker_checks(IsolationConfig(runtime="docker", allow_egress=True))["egress"]

    assert check == Check("egress", "FAIL", problems)


def test_without_an_engine_only_the_toolkit_is_checked_further(monkeypatch):
    def no_engine(sandbox_runtime: str = ""):
        raise RuntimeUnavailable("no Docker engine: socket not found")

    monkeypatch.setattr(doctor, "connect", no_engine)

    checks = doctor.runtime_checks(DOCKER, simulated=True, run=NO_TOOLKIT)

    assert [(check.name, check.status) for check in checks] == [
        ("runtime", "FAIL"), ("cpus", "skip"), ("egress", "skip"), ("toolkit", "skip")
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("answers", "unfixed"),
    [
        ({"nvidia-ctk": "NVIDIA Container Toolkit CLI version 1.17.8\ncommit: abc"}, ()),
        ({"nvidia-ctk": "NVIDIA Container Toolkit CLI version 1.17.10\ncommit: abc"}, ()),
        ({"nvidia-ctk": "NVIDIA Container Toolkit CLI version 1.17.4\ncommit: abc"}, CVES[2:]),
        ({"nvidia-ctk": "NVIDIA Container Toolkit CLI version 1.16.2\ncommit: abc"}, CVES[1:]),
        ({"nvidia-container-cli": "cli-version: 1.16.1\nlib-version: 1.16.1\n"}, CVES),
    ],
)
def test_the_container_toolkit_must_have_every_container_escape_fixed(answers, unfixed):
    check = docker_checks(simulated=False, run=toolkit(answers))["toolkit"]

    assert check.status == ("FAIL" if unfixed else "ok")
    assert [cve for cve in CVES if f"{cve} (fixed in" in check.detail] == list(unfixed)
    if unfixed:
        assert check.detail.endswith("; upgrade to 1.17.8 or later")
    else:
        assert check.detail.endswith(f"with the fixes of {', '.join(CVES)}")


def test_a_missing_container_toolkit_fails():
    check = docker_checks(simulated=False, run=NO_TOOLKIT)["toolkit"]

    assert check == Check(
        "toolkit",
        "FAIL",
        "the NVIDIA Container Toolkit is not installed (nvidia-container-cli: not installed): install 1.17.8 or later",
    )


def test_a_container_toolkit_without_a_version_fails():
    check = docker_checks(simulated=False, run=toolkit({"nvidia-ctk": "something else"}))["toolkit"]

    assert check == Check("toolkit", "FAIL", "no version in nvidia-ctk --version's answer 'something else'")


def test_simulated_gpus_need_no_container_toolkit():
    def run(argv):
        pytest.fail(f"ran {argv}")

    check = docker_checks(run=run)["toolkit"]

    assert check == Check("toolkit", "skip", "simulated GPUs: no GPU is handed to a container")


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
