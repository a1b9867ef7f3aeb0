import time
from datetime import datetime

import pytest
from docker.errors import APIError
from docker.types import DeviceRequest

from nodes.agent.egress import EgressUnavailable
from nodes.agent.isolation import IsolationConfig
from nodes.agent.runtime import JobSpec, RuntimeUnavailable, StartFailed
from nodes.agent.runtime.docker import DockerHandle, DockerRuntime, connect
from tests.agent.docker_fakes import FakeContainer, FakeDocker, digest_of

ALLOCATION = "5f0c9a4e-1b2d-4c3e-8f6a-7b8c9d0e1f2a"
NAME = f"shedshare-{ALLOCATION}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine():
    return FakeDocker()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def runtime(engine, clock, tmp_path):
    return DockerRuntime(engine, IsolationConfig(runtime="docker"), tmp_path / "logs", kill_grace_s=10, clock=clock)


def job(image: str = "python:3.12-slim", allocation: str = ALLOCATION, **extra) -> JobSpec:
    return JobSpec(allocation, "job-1", image, ("python", "-c", "print(1)"), ("GPU-aaa", "GPU-bbb"), **extra)


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


def test_start_creates_the_hardened_container_with_the_assigned_gpus_and_starts_it(engine, runtime):
    runtime.start(job())

    [container] = engine.created
    assert container.status == "running"
    assert container.kwargs["device_requests"] == [
        DeviceRequest(driver="nvidia", device_ids=["GPU-aaa", "GPU-bbb"], capabilities=[["gpu"]])
    ]
    assert container.kwargs["name"] == NAME
    assert container.kwargs["cap_drop"] == ["ALL"] and container.kwargs["read_only"] is True
    assert container.kwargs["network_mode"] == "none"
    assert engine.bridges == {}


def test_poll_reports_running_then_the_exit_code_and_cleanup_removes_the_container(engine, runtime):
    handle = runtime.start(job())
    assert runtime.poll(handle) is None

    engine.created[0].exit(3)

    assert runtime.poll(handle) == 3
    runtime.cleanup(handle)
    assert engine.removed == [(NAME, True)]


def test_the_containers_output_lands_in_the_allocation_log_as_it_runs(engine, runtime):
    handle = runtime.start(job())

    assert wait_for(lambda: handle.log_path.exists() and handle.log_path.read_text()) == "hello from a container\n"
    engine.created[0].exit(0)
    runtime.poll(handle)
    runtime.cleanup(handle)
    assert handle.log_path.read_text() == "hello from a container\n"


def test_kill_asks_politely_then_kills_after_the_grace_period(engine, runtime, clock):
    engine.ignore_sigterm = True
    handle = runtime.start(job())

    runtime.kill(handle)
    runtime.kill(handle)
    assert runtime.poll(handle) is None
    clock.now += 10

    assert runtime.poll(handle) is None
    assert engine.created[0].signals == ["SIGTERM", "SIGKILL"]
    assert runtime.poll(handle) == 137


def test_a_job_that_stops_on_sigterm_reports_143(engine, runtime):
    handle = runtime.start(job())

    runtime.kill(handle)

    assert runtime.poll(handle) == 143
    assert engine.created[0].signals == ["SIGTERM"]


def test_a_missing_image_is_pulled_in_the_background_before_the_start(engine, runtime):
    engine.pull_release.clear()
    pull = runtime.pull(job("ghcr.io/renter/trainer:1"))

    assert not pull.done()
    engine.pull_release.set()

    assert pull.result(timeout=5) == digest_of("ghcr.io/renter/trainer:1")
    assert engine.pulls == ["ghcr.io/renter/trainer:1"] and engine.pull_auth == [None]
    runtime.start(job("ghcr.io/renter/trainer:1"))
    assert engine.created[0].status == "running"


def test_an_image_here_is_used_without_a_pull(engine, runtime):
    digest = runtime.pull(job("python:3.12-slim")).result(timeout=5)

    assert digest == digest_of("python:3.12-slim")
    assert engine.pulls == []


def test_a_failed_pull_fails_the_start_and_says_so_without_the_engines_answer(engine, runtime, caplog):
    engine.pull_error = "Get http://10.0.0.5:5000/v2/: dial tcp 10.0.0.5:5000: connect: connection refused"

    with pytest.raises(StartFailed) as failed:
        runtime.pull(job("ghcr.io/renter/missing:1")).result(timeout=5)

    assert str(failed.value) == (
        "cannot pull ghcr.io/renter/missing:1: the pull failed (the engine's answer is in the unit owner's log)"
    )
    assert "connection refused" in caplog.text  # the owner's log keeps it


def test_a_job_whose_image_is_not_here_fails_the_start(engine, runtime):
    with pytest.raises(StartFailed, match="ImageNotFound"):
        runtime.start(job("ghcr.io/renter/never-pulled:1"))

    assert engine.by_name == {}


def test_a_container_the_engine_cannot_start_fails_the_start_and_is_removed(engine, runtime):
    engine.fail_start = True

    with pytest.raises(StartFailed, match="could not select device driver"):
        runtime.start(job())

    assert engine.removed == [(NAME, True)]


def test_the_secrets_reach_the_container_and_no_engine_error_quotes_them(engine, runtime, monkeypatch):
    handle = runtime.start(job(secrets=("HF_TOKEN",)), {"HF_TOKEN": "hf_value"})
    assert engine.created[0].kwargs["environment"]["HF_TOKEN"] == "hf_value"
    assert "hf_value" not in repr(handle)

    def refuse(container) -> None:
        raise APIError(f"invalid environment HF_TOKEN={container.kwargs['environment']['HF_TOKEN']}")

    monkeypatch.setattr(FakeContainer, "start", refuse)
    with pytest.raises(StartFailed) as failed:
        runtime.start(job(allocation="other", secrets=("HF_TOKEN",)), {"HF_TOKEN": "hf_value"})

    assert str(failed.value) == "APIError: invalid environment HF_TOKEN=***"


def test_a_job_it_cannot_isolate_fails_before_anything_is_created(engine, tmp_path):
    runtime = DockerRuntime(engine, IsolationConfig(runtime="docker", sandbox_runtime=""), tmp_path)

    with pytest.raises(StartFailed, match="sandbox"):
        runtime.start(job(sandboxed=True))

    assert engine.created == []


class Guard:
    def __init__(self, problem: str = "") -> None:
        self.problem, self.checks = problem, 0

    def ensure(self) -> None:
        self.checks += 1
        if self.problem:
            raise EgressUnavailable(self.problem)


def test_an_egress_job_gets_the_units_bridge_with_its_rules_checked_first(engine, clock, tmp_path):
    guard = Guard()
    runtime = DockerRuntime(engine, IsolationConfig(runtime="docker"), tmp_path, clock=clock, egress=guard)

    runtime.start(job(network_egress=True))
    runtime.start(job(network_egress=False, allocation="other"))

    assert engine.created[0].kwargs["network_mode"] == "shedshare-egress"
    assert engine.created[1].kwargs["network_mode"] == "none"
    options = engine.bridges["shedshare-egress"]["options"]
    assert options["com.docker.network.bridge.enable_icc"] == "false"  # no traffic between jobs
    assert engine.bridges["shedshare-egress"]["enable_ipv6"] is False
    assert guard.checks == 1  # only the job that may reach the network needs the rules


@pytest.mark.parametrize("guard", [None, Guard("iptables: not installed")])
def test_an_egress_job_does_not_start_where_its_rules_cannot_be_kept(engine, clock, tmp_path, guard):
    runtime = DockerRuntime(engine, IsolationConfig(runtime="docker"), tmp_path, clock=clock, egress=guard)

    with pytest.raises(StartFailed, match="egress|iptables"):
        runtime.start(job(network_egress=True))
    assert engine.by_name == {}  # nothing was left behind


def test_a_restarted_agent_adopts_its_running_container_by_name(engine, runtime, tmp_path):
    first = runtime.start(job())
    saved = runtime.describe(first)

    adopted = runtime.adopt(job(), saved)

    assert adopted is not None and adopted.exit_code is None
    assert isinstance(adopted.handle, DockerHandle) and adopted.handle.container is engine.created[0]
    assert runtime.poll(adopted.handle) is None


def test_a_container_that_ended_while_the_agent_was_away_is_adopted_with_its_exit(engine, runtime):
    saved = runtime.describe(runtime.start(job()))
    engine.created[0].exit(7, finished_at="2025-01-02T03:04:05.5Z")

    adopted = runtime.adopt(job(), saved)

    assert adopted is not None and adopted.exit_code == 7
    assert adopted.exited_at == pytest.approx(1735787045.5)


def test_a_container_that_is_gone_cannot_be_adopted(engine, runtime):
    saved = runtime.describe(runtime.start(job()))
    engine.by_name.clear()

    assert runtime.adopt(job(), saved) is None


def test_connect_says_plainly_when_no_engine_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")

    with pytest.raises(RuntimeUnavailable, match="no Docker engine"):
        connect()


def test_connect_refuses_a_sandbox_runtime_the_engine_does_not_have(monkeypatch):
    monkeypatch.setattr("docker.from_env", lambda **kwargs: FakeDocker())

    with pytest.raises(RuntimeUnavailable, match="no 'runsc' runtime"):
        connect("runsc")


def test_a_container_the_agent_was_starting_is_found_by_name_and_started(engine, runtime, tmp_path):
    """Killed between creating the container and starting it (or recording it): the record has
    no handle, the name finds the container, and a created one is started now."""
    runtime.start(job())
    container = engine.created[0]
    container.status = "created"
    container.attrs["State"]["StartedAt"] = "2025-01-02T03:04:05Z"

    adopted = runtime.adopt(job(), {})

    assert adopted is not None and adopted.handle.container is container
    assert container.status == "running"
    assert adopted.handle.log_path == tmp_path / "logs" / f"{ALLOCATION}.log"
    assert adopted.started_at == datetime.fromisoformat("2025-01-02T03:04:05+00:00").timestamp()


def test_a_never_started_container_has_no_start_time(engine, runtime):
    runtime.start(job())
    engine.created[0].exit(1)  # FinishedAt and StartedAt as the engine writes "never"
    engine.created[0].attrs["State"]["StartedAt"] = "0001-01-01T00:00:00Z"

    assert runtime.adopt(job(), {}).started_at is None
