"""Jobs with environment variables and secrets: the agent asks for a job's secrets just before its
start, never starts it without them, keeps them off its disk and out of its own log, and masks
them in the job's log. The real loop against the fake server, with a runtime that starts nothing
and a clock that moves only when the loop sleeps."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodes.agent import gpus
from nodes.agent.allocations import InvalidAssignment, parse_assignment
from nodes.agent.client import AgentClient
from nodes.agent.loop import Agent, Options
from nodes.agent.runtime import Adopted, JobSpec
from nodes.agent.runtime.environment import NO_SECRETS, Secrets, redact
from tests.agent.fakes import CREDENTIAL, HONOURS_ALL, UNIT_ID, FakeServer

OPTIONS = Options(usage_interval_s=5, tick_s=1, poll_wait_s=0, error_base_s=1, start_give_up_s=60)
TOKEN = "hf_s3cr3t_t0ken"
MASKED = "*" * len(TOKEN)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Stop(BaseException):
    """Ends the loop where a test is done with it, like kill -9: nothing in the agent handles it."""


class JobsOnPaper:
    """A runtime that starts nothing: it keeps what each job was given, a job's output is what the
    test writes to its log, and a job ends when the test says. Adoptable, so the agent journals."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.given: dict[str, tuple[JobSpec, dict[str, str]]] = {}
        self.exit_codes: dict[str, int] = {}

    def start(self, spec: JobSpec, secrets=NO_SECRETS) -> SimpleNamespace:
        self.given[spec.allocation_id] = (spec, dict(secrets))
        self.log_dir.mkdir(exist_ok=True)
        handle = SimpleNamespace(spec=spec, log_path=self.log_dir / f"{spec.allocation_id}.log")
        handle.log_path.touch()
        return handle

    def poll(self, handle) -> int | None:
        return self.exit_codes.get(handle.spec.allocation_id)

    def kill(self, handle) -> None:
        self.exit_codes.setdefault(handle.spec.allocation_id, 143)

    def cleanup(self, handle) -> None:
        pass

    def describe(self, handle) -> dict:
        return {"log_path": str(handle.log_path)}

    def adopt(self, spec: JobSpec, saved: dict) -> Adopted:
        return Adopted(SimpleNamespace(spec=spec, log_path=Path(saved["log_path"])))

    def write(self, allocation_id: str, text: str) -> None:
        with open(self.log_dir / f"{allocation_id}.log", "a") as log:
            log.write(text)


@pytest.fixture
def runtime(tmp_path) -> JobsOnPaper:
    return JobsOnPaper(tmp_path / "job-logs")


def agent_on(server: FakeServer, tmp_path: Path, runtime: JobsOnPaper, until, clock: Clock | None = None) -> Agent:
    """An agent on tmp_path's state folder whose loop stops once `until(agent)` holds."""
    client = AgentClient("http://shed.test", CREDENTIAL, transport=server.transport())
    clock = clock or Clock()
    ticks = iter(range(1000))  # a guard against a loop that never gets there

    def sleep(seconds: float) -> None:
        clock.now += seconds
        assert next(ticks) < 999, "the agent loop did not get there"
        if until(agent):
            raise Stop

    state = tmp_path / "state"
    agent = Agent(
        client, runtime, server.inventory, OPTIONS, clock=clock, sleep=sleep, rng=lambda: 0.5,
        policy=HONOURS_ALL, state_dir=state, status_path=state / "status.json",
    )  # fmt: skip
    return agent


def run(agent: Agent) -> None:
    with pytest.raises(Stop):
        agent.run()


def calls_about(server: FakeServer, allocation_id: str) -> list[str]:
    prefix = f"/allocations/{allocation_id}/"
    return [path.removeprefix(prefix) for _, path in server.calls if path.startswith(prefix)]


def finished(server: FakeServer, allocation_id: str):
    return lambda agent: allocation_id in server.finished and not agent.reporter.outbox


def test_the_secrets_are_asked_for_just_before_the_start_and_given_to_the_runtime(server, tmp_path, runtime):
    allocation_id = server.assign(["train"], env={"EPOCHS": "3"}, secrets={"HF_TOKEN": TOKEN})

    run(agent_on(server, tmp_path, runtime, until=lambda agent: allocation_id in runtime.given))

    assert calls_about(server, allocation_id) == ["secrets", "start"]
    spec, secrets = runtime.given[allocation_id]
    assert spec.env == {"EPOCHS": "3"} and spec.secrets == ("HF_TOKEN",)
    assert secrets == {"HF_TOKEN": TOKEN}


@pytest.mark.parametrize("env", [{"EPOCHS": "3"}, None], ids=["plain variables only", "an older server"])
def test_a_job_without_secrets_starts_without_asking_for_any(server, tmp_path, runtime, env):
    allocation_id = server.assign(["train"], env=env)

    run(agent_on(server, tmp_path, runtime, until=lambda agent: allocation_id in runtime.given))

    assert calls_about(server, allocation_id) == ["start"]
    spec, secrets = runtime.given[allocation_id]
    assert spec.env == (env or {}) and spec.secrets == () and secrets == {}


def test_a_409_means_the_server_ended_the_allocation_and_the_job_never_starts(server, tmp_path, runtime):
    server.secrets_status = 409
    allocation_id = server.assign(["train"], secrets={"HF_TOKEN": TOKEN})

    run(agent_on(server, tmp_path, runtime, until=finished(server, allocation_id)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "cancelled"}
    assert calls_about(server, allocation_id) == ["secrets", "finish"]
    assert runtime.given == {}


def test_secrets_the_server_will_not_give_are_a_refusal_with_its_reason(server, tmp_path, runtime, caplog):
    server.secrets_status = 404
    allocation_id = server.assign(["train"], secrets={"HF_TOKEN": TOKEN})

    with caplog.at_level(logging.INFO, logger="nodes.agent.loop"):
        run(agent_on(server, tmp_path, runtime, until=finished(server, allocation_id)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "secrets_unavailable"}
    assert calls_about(server, allocation_id) == ["secrets", "finish"]
    assert runtime.given == {}
    assert f"event=assignment_refused allocation={allocation_id} reason=secrets_unavailable" in caplog.text


def test_an_answer_without_every_secret_is_a_refusal_too(server, tmp_path, runtime):
    allocation_id = server.assign(["train"], secrets={"HF_TOKEN": TOKEN, "WANDB_KEY": "wandb-key"})
    del server.secrets[allocation_id]["WANDB_KEY"]

    run(agent_on(server, tmp_path, runtime, until=finished(server, allocation_id)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "secrets_unavailable"}
    assert runtime.given == {}


def test_during_an_outage_the_agent_asks_again_and_starts_only_with_the_secrets(server, tmp_path, runtime):
    server.failures["/secrets"] = 3
    allocation_id = server.assign(["train"], secrets={"HF_TOKEN": TOKEN})

    run(agent_on(server, tmp_path, runtime, until=lambda agent: allocation_id in runtime.given))

    assert calls_about(server, allocation_id) == ["secrets"] * 4 + ["start"]
    assert runtime.given[allocation_id][1] == {"HF_TOKEN": TOKEN}


def test_asking_again_backs_off(server, tmp_path, runtime):
    server.secrets_status = 503
    allocation_id = server.assign(["train"], secrets={"HF_TOKEN": TOKEN})
    clock = Clock()
    asked_at = []
    answer = server._secrets

    def recording(allocation: str):
        asked_at.append(clock.now)
        if len(asked_at) == 5:
            server.secrets_status = 200
        return answer(allocation)

    server._secrets = recording

    run(agent_on(server, tmp_path, runtime, until=lambda agent: allocation_id in runtime.given, clock=clock))

    gaps = [later - earlier for earlier, later in zip(asked_at, asked_at[1:], strict=False)]
    assert len(gaps) == 4 and gaps == sorted(gaps) and gaps[0] < gaps[-1]
    assert calls_about(server, allocation_id)[-2:] == ["secrets", "start"]


def test_an_outage_past_the_give_up_time_ends_the_job_unstarted(server, tmp_path, runtime):
    server.secrets_status = 503
    allocation_id = server.assign(["train"], secrets={"HF_TOKEN": TOKEN})

    run(agent_on(server, tmp_path, runtime, until=finished(server, allocation_id)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "start_unconfirmed"}
    assert "start" not in calls_about(server, allocation_id)
    assert runtime.given == {}


def files_holding(folder: Path, text: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


def test_secret_values_stay_off_the_agents_disk_and_log_and_are_masked_in_the_jobs_log(
    server, tmp_path, runtime, caplog
):
    allocation_id = server.assign(["train"], env={"EPOCHS": "3"}, secrets={"HF_TOKEN": TOKEN})
    record = tmp_path / "state" / "allocations" / f"{allocation_id}.json"
    leaks, records, written = [], [], []

    def job_writes_its_token_in_two_goes(agent: Agent) -> bool:
        leaks.extend(files_holding(tmp_path / "state", TOKEN))
        if record.exists():
            records.append(json.loads(record.read_text()))
        if allocation_id not in runtime.given:
            return False
        text = server.log_text(allocation_id)
        if not written:
            written.append(f"token={TOKEN[:6]}")
        elif len(written) == 1 and text == "token=":  # the start of the token waited for the rest
            written.append(f"{TOKEN[6:]} again {TOKEN}\n")
        elif text.endswith("\n"):
            runtime.exit_codes[allocation_id] = 0
            return finished(server, allocation_id)(agent)
        else:
            return False
        runtime.write(allocation_id, written[-1])
        return False

    with caplog.at_level(logging.DEBUG):
        run(agent_on(server, tmp_path, runtime, until=job_writes_its_token_in_two_goes))

    assert server.log_text(allocation_id) == f"token={MASKED} again {MASKED}\n"
    assert sorted(server.logs[allocation_id]) == [0, len("token=")]  # offsets of the file's bytes
    assert server.finished[allocation_id] == {"exit_code": 0, "reason": "exited"}
    assert records and all(r["spec"]["env"] == {"EPOCHS": "3"} for r in records)
    assert all(r["spec"]["secrets"] == ["HF_TOKEN"] for r in records)
    assert leaks == []
    assert TOKEN not in caplog.text


def test_a_restarted_agent_asks_again_for_the_secrets_to_mask_the_log(server, tmp_path, runtime):
    allocation_id = server.assign(["train"], secrets={"HF_TOKEN": TOKEN})
    run(agent_on(server, tmp_path, runtime, until=lambda agent: allocation_id in runtime.given))
    runtime.write(allocation_id, f"token={TOKEN}\n")  # while the agent is away
    runtime.exit_codes[allocation_id] = 0

    run(agent_on(server, tmp_path, runtime, until=finished(server, allocation_id)))

    assert calls_about(server, allocation_id).count("secrets") == 2
    assert server.log_text(allocation_id) == f"token={MASKED}\n"
    assert server.finished[allocation_id] == {"exit_code": 0, "reason": "exited"}


def test_a_restarted_agent_that_cannot_have_the_secrets_again_withholds_the_log(server, tmp_path, runtime, caplog):
    """It cannot tell a secret in the log from anything else, so it ships none of it and says so."""
    allocation_id = server.assign(["train"], secrets={"HF_TOKEN": TOKEN})
    run(agent_on(server, tmp_path, runtime, until=lambda agent: allocation_id in runtime.given))
    runtime.write(allocation_id, f"token={TOKEN}\n")
    server.secrets_status = 404
    clock = Clock()

    def job_ends_after_a_while(agent: Agent) -> bool:
        if clock.now > 3 * OPTIONS.usage_interval_s:
            runtime.exit_codes[allocation_id] = 0
        return finished(server, allocation_id)(agent)

    with caplog.at_level(logging.DEBUG):
        run(agent_on(server, tmp_path, runtime, until=job_ends_after_a_while, clock=clock))

    assert server.finished[allocation_id] == {"exit_code": 0, "reason": "exited"}
    assert server.logs[allocation_id] == {}
    assert calls_about(server, allocation_id).count("secrets") >= 4  # once at start, then at each report
    assert f"event=logs_withheld allocation={allocation_id}" in caplog.text
    assert "event=secrets_unavailable" in caplog.text
    assert TOKEN not in caplog.text


SHED = gpus.simulate("1xH100-80GB", UNIT_ID)


def assignment(**job) -> dict:
    job = {"id": "job-1", "image": "img", "command": ["true"], **job}
    return {"allocation_id": "a-1", "job": job, "gpus": [{"uuid": SHED[0].uuid}]}


def test_an_assignment_carries_the_jobs_variables_and_the_names_of_its_secrets():
    allocation = parse_assignment(assignment(env={"EPOCHS": "3"}, secrets=["HF_TOKEN"]), {g.uuid: g for g in SHED}, 0.0)

    assert allocation.spec.env == {"EPOCHS": "3"} and allocation.spec.secrets == ("HF_TOKEN",)
    assert allocation.awaiting_secrets


@pytest.mark.parametrize(
    "job",
    [
        {"env": ["EPOCHS=3"]},
        {"env": {"EPOCHS": 3}},
        {"env": {"BAD-NAME": "private value"}},
        {"env": {"NUL": "private\0value"}},
        {"secrets": "HF_TOKEN"},
        {"secrets": ["1ST"]},
        {"registry_auth": "private value"},
    ],
)
def test_malformed_variables_are_refused_without_quoting_a_value(job):
    with pytest.raises(InvalidAssignment) as refused:
        parse_assignment(assignment(**job), {g.uuid: g for g in SHED}, 0.0)

    assert refused.value.reason == "start_failed"
    assert "private" not in str(refused.value)


def test_secrets_never_show_their_values():
    secrets = Secrets({"HF_TOKEN": TOKEN, "PIN": "123"})

    assert repr(secrets) == str(secrets) == "Secrets(['HF_TOKEN', 'PIN'])"
    assert redact(f"the engine said HF_TOKEN={TOKEN}", secrets) == "the engine said HF_TOKEN=***"
