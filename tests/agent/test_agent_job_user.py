"""The process runtime never runs a job with the agent's privileges."""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from nodes.agent import config
from nodes.agent.isolation import IsolationConfig
from nodes.agent.runtime import RuntimeUnavailable
from nodes.agent.runtime.factory import runtime_for
from nodes.agent.runtime.job_user import JobUser, job_user_for, jobs_root
from nodes.agent.runtime.process import ProcessRuntime
from tests.agent.fakes import wait_exit
from tests.agent.test_agent_process_runtime import spec

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs the agent to run as root")
NOBODY = JobUser(65534, 65534)


@pytest.fixture
def open_tmp():
    """A folder anyone may enter, as /var/lib is: pytest's own temporary folders are root's alone,
    which would hide what the file modes do."""
    path = Path(tempfile.mkdtemp(prefix="shedshare-test-"))
    os.chmod(path, 0o755)  # noqa: S103 - the point of the fixture
    yield path
    shutil.rmtree(path)


def agent_config(tmp_path, **isolation) -> config.AgentConfig:
    path = tmp_path / "agent" / "agent.json"
    config.save_enrolment(path, url="http://s", unit_id="u", credential="shs_node_secret")
    return config.load(path) if not isolation else config.load(path, **isolation)


@pytest.mark.parametrize(
    ("setting", "euid", "user"),
    [("65534:65534", 0, NOBODY), ("1234", 0, JobUser(1234, 1234)), ("nobody", 0, None), ("65534:65534", 1000, None)],
)
def test_jobs_run_as_the_job_user_only_when_the_agent_is_root(setting, euid, user):
    found = job_user_for(setting, euid)

    if setting == "nobody" and euid == 0:
        assert found is not None and found.uid != 0
    else:
        assert found == user


@pytest.mark.parametrize("setting", ["0", "0:0", "65534:0", "root"])
def test_root_is_never_a_job_user(setting):
    with pytest.raises(RuntimeUnavailable, match="root"):
        job_user_for(setting, 0)


def test_an_unknown_job_user_is_refused_and_a_malformed_one_is_a_config_error(tmp_path):
    with pytest.raises(RuntimeUnavailable, match="no such user"):
        job_user_for("no-such-user-here", 0)
    with pytest.raises(config.ConfigError, match="job_user"):
        agent_config(tmp_path, job_user="65534:nogroup:x")


def test_an_agent_that_is_not_root_runs_jobs_as_itself_and_says_so(tmp_path, caplog):
    cfg = agent_config(tmp_path, allow_unisolated_dev_runtime=True)

    with caplog.at_level(logging.WARNING):
        runtime = runtime_for(cfg, euid=1000)

    assert isinstance(runtime, ProcessRuntime) and runtime.job_user is None
    assert "event=jobs_run_as_agent_user" in caplog.text


@as_root
def test_a_root_agent_runs_jobs_as_the_job_user_outside_its_private_state(tmp_path):
    cfg = agent_config(tmp_path, allow_unisolated_dev_runtime=True)

    runtime = runtime_for(cfg, euid=0)

    assert runtime.job_user == NOBODY
    # The default work dir is inside the agent's 0700 state dir, which the job user must not enter.
    assert not runtime.work_dir.is_relative_to(cfg.state_dir)
    assert runtime.work_dir.stat().st_mode & 0o777 == 0o711


@as_root
def test_a_reachable_work_dir_is_used_as_it_is(open_tmp):
    assert jobs_root(open_tmp / "jobs", NOBODY) == open_tmp / "jobs"


@as_root
def test_a_folder_someone_else_made_in_the_temporary_directory_is_not_used(open_tmp, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(open_tmp))
    squatted = open_tmp / f"shedshare-jobs-{os.geteuid()}"
    squatted.mkdir()
    os.chown(squatted, 65534, 65534)
    private = open_tmp / "private"
    private.mkdir(mode=0o700)

    with pytest.raises(RuntimeUnavailable, match="not a folder of this agent's user"):
        jobs_root(private / "work", NOBODY)


@as_root
def test_a_job_of_a_root_agent_runs_unprivileged_and_cannot_read_the_agents_config_or_state(open_tmp):
    cfg = agent_config(open_tmp, allow_unisolated_dev_runtime=True)
    secret = open_tmp / "agent" / "agent.json"
    os.chmod(secret.parent, 0o755)  # noqa: S103 - even where the owner opened the config's folder to everyone
    os.chmod(secret, 0o644)
    assert config.keep_private(secret, cfg) == []
    runtime = runtime_for(cfg, euid=0)
    script = f"id -u; id -g; id -G; umask; cat {secret}; ls {cfg.state_dir}; touch $HOME/mine && echo wrote"

    handle = runtime.start(spec("sh", "-c", script))
    code = wait_exit(runtime, handle)

    out = handle.log_path.read_text()
    assert code == 0, out
    assert out.splitlines()[:4] == ["65534", "65534", "65534", "0077"]
    assert "shs_node_secret" not in out
    assert out.count("Permission denied") == 2
    assert "wrote" in out
    assert (handle.workdir.stat().st_uid, handle.workdir.stat().st_mode & 0o777) == (65534, 0o700)
    assert handle.log_path.stat().st_mode & 0o777 == 0o600
    runtime.cleanup(handle)
    assert not handle.workdir.exists()


@as_root
def test_a_job_cannot_forge_its_exit_code(open_tmp):
    runtime = ProcessRuntime(open_tmp / "work", open_tmp / "state" / "logs", job_user=NOBODY)
    forge = f'echo \'{{"exit_code": 0, "exited_at": 1}}\' > {runtime.log_dir}/x.exit; exit 9'

    handle = runtime.start(spec("sh", "-c", forge))

    assert wait_exit(runtime, handle) == 9
    assert "Permission denied" in handle.log_path.read_text()


def test_the_config_file_and_state_dir_are_made_private_to_the_agent(tmp_path):
    cfg = agent_config(tmp_path)
    path = tmp_path / "agent" / "agent.json"
    os.chmod(path, 0o644)
    cfg.state_dir.mkdir(mode=0o755)

    assert config.keep_private(path, cfg) == []

    assert path.stat().st_mode & 0o777 == 0o600
    assert cfg.state_dir.stat().st_mode & 0o777 == 0o700
    assert json.loads(path.read_text())["credential"] == "shs_node_secret"


def test_what_cannot_be_made_private_is_reported_not_fatal(tmp_path):
    cfg = agent_config(tmp_path)

    problems = config.keep_private(Path("/nonexistent/agent.json"), cfg)

    assert problems and "/nonexistent/agent.json" in problems[0]


def test_the_default_job_user_is_nobody():
    assert IsolationConfig().job_user == "65534:65534"
