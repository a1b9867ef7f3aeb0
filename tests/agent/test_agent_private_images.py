"""Private images and image digests: a job that names a registry credential has its image pulled
with it, for that pull only, and the start names the digest of the image the job runs from. The
real loop and Docker runtime against the fake server and the fake engine, with a clock that moves
only when the loop sleeps; each sleep waits for the pulls under way, so that no test depends on
how fast a thread runs."""

import logging
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import pytest

from nodes.agent.client import AgentClient
from nodes.agent.images import ImagePolicy
from nodes.agent.isolation import IsolationConfig
from nodes.agent.loop import Agent
from nodes.agent.runtime import StartFailed
from nodes.agent.runtime.docker import DockerRuntime
from nodes.agent.runtime.environment import RegistryCredential, Secrets, masks, redact
from nodes.agent.runtime.image_store import PulledImages
from tests.agent.docker_fakes import FakeDocker, digest_of
from tests.agent.fakes import CREDENTIAL, HONOURS_ALL, FakeServer
from tests.agent.test_agent_docker_runtime import job
from tests.agent.test_agent_secrets import OPTIONS, Clock, Stop, calls_about, files_holding, finished, run

PRIVATE = "ghcr.io/acme/private:1"
PUBLIC = "ghcr.io/acme/public:1"
PASSWORD = "ghp_r3g1stry_p4ssw0rd"
LOGIN = {"username": "renter-bot", "password": PASSWORD}
CREDENTIAL_OF_RENTER = RegistryCredential("renter-bot", PASSWORD)
PINNED = "ghcr.io/acme/private@sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
# A unit that pulls from the default public registries, ghcr.io resolving to a public address.
PULLS_FROM_PUBLIC = replace(HONOURS_ALL, registries=ImagePolicy(resolve=lambda host: ["140.82.121.3"]))


@pytest.fixture
def engine() -> FakeDocker:
    return FakeDocker()


def agent_on(
    server: FakeServer, tmp_path: Path, engine: FakeDocker, until, *, clock: Clock | None = None, wait_pulls=True
) -> Agent:
    """An agent with the Docker runtime on tmp_path's state folder; its loop stops once
    `until(agent)` holds. With `wait_pulls`, every sleep waits for the pulls under way."""
    client = AgentClient("http://shed.test", CREDENTIAL, transport=server.transport())
    clock = clock or Clock()
    state = tmp_path / "state"
    runtime = DockerRuntime(
        engine, IsolationConfig(runtime="docker"), tmp_path / "logs", clock=clock, pulled=PulledImages(state)
    )
    ticks = iter(range(1000))  # a guard against a loop that never gets there

    def sleep(seconds: float) -> None:
        clock.now += seconds
        assert next(ticks) < 999, "the agent loop did not get there"
        if wait_pulls:
            futures.wait([a.pull for a in agent.allocations.values() if a.pull is not None], timeout=5)
        if until(agent):
            raise Stop

    agent = Agent(
        client, runtime, server.inventory, OPTIONS, clock=clock, sleep=sleep, rng=lambda: 0.5,
        policy=PULLS_FROM_PUBLIC, state_dir=state,
    )  # fmt: skip
    return agent


def assign_on_gpu(server: FakeServer, index: int, **job) -> str:
    """Queue a one-GPU job on the unit's GPU `index`, so that several run side by side."""
    allocation_id = server.assign(["train"], gpu_count=1, **job)
    server.queue[-1]["gpus"] = [{"index": index, "uuid": server.inventory[index].uuid}]
    return allocation_id


def test_the_credential_goes_with_the_pull_of_its_jobs_image_and_no_other(server, tmp_path, engine):
    engine.private_images[PRIVATE] = LOGIN
    private = assign_on_gpu(server, 0, image=PRIVATE, registry=LOGIN)
    public = assign_on_gpu(server, 1, image=PUBLIC)

    run(agent_on(server, tmp_path, engine, until=lambda agent: len(engine.created) == 2))

    assert list(zip(engine.pulls, engine.pull_auth, strict=True)) == [(PRIVATE, LOGIN), (PUBLIC, None)]
    assert calls_about(server, private) == ["secrets", "start"]
    assert calls_about(server, public) == ["start"]  # nothing to ask for


def test_the_start_names_the_digest_of_the_image_the_job_runs_from(server, tmp_path, engine):
    pulled = assign_on_gpu(server, 0, image=PRIVATE, registry=LOGIN)
    here = assign_on_gpu(server, 1, image="python:3.12-slim")

    run(agent_on(server, tmp_path, engine, until=lambda agent: len(engine.created) == 2))

    assert server.start_bodies == {
        pulled: {"image_digest": digest_of(PRIVATE), "runs_in": "container"},
        here: {"image_digest": digest_of("python:3.12-slim"), "runs_in": "container"},
    }


def test_an_image_without_a_repo_digest_starts_without_one(server, tmp_path, engine):
    engine.digests["python:3.12-slim"] = None  # built here, never pushed
    allocation_id = server.assign(["train"], image="python:3.12-slim")

    run(agent_on(server, tmp_path, engine, until=lambda agent: engine.created))

    assert server.start_bodies[allocation_id] == {"runs_in": "container"}


def test_the_credential_stays_off_the_disk_and_the_agents_log_and_is_masked_in_the_jobs_log(
    server, tmp_path, engine, caplog
):
    engine.private_images[PRIVATE] = LOGIN
    engine.output = [f"logged in with {PASSWORD}\n".encode()]
    allocation_id = server.assign(["train"], image=PRIVATE, registry=LOGIN)
    leaks = []

    def job_ends_once_it_ran(agent: Agent) -> bool:
        leaks.extend(files_holding(tmp_path / "state", PASSWORD))
        if engine.created and engine.created[0].status == "running":
            engine.created[0].exit(0)
        return finished(server, allocation_id)(agent)

    with caplog.at_level(logging.DEBUG):
        run(agent_on(server, tmp_path, engine, until=job_ends_once_it_ran))

    assert server.finished[allocation_id] == {"exit_code": 0, "reason": "exited"}
    assert server.log_text(allocation_id) == f"logged in with {'*' * len(PASSWORD)}\n"
    assert (tmp_path / "state" / "images.json").exists() and leaks == []
    assert PASSWORD not in caplog.text


def test_a_failed_private_pull_fails_the_job_unstarted_and_quotes_neither_credential_nor_engine(
    server, tmp_path, engine, caplog
):
    engine.pull_error = f"Head https://ghcr.io/v2/acme/private/manifests/1: unauthorized: {PASSWORD} is expired"
    allocation_id = server.assign(["train"], image=PRIVATE, registry=LOGIN)

    with caplog.at_level(logging.DEBUG):
        run(agent_on(server, tmp_path, engine, until=finished(server, allocation_id)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "start_failed"}
    assert calls_about(server, allocation_id) == ["secrets", "logs", "finish"]
    assert server.log_text(allocation_id) == (
        f"shedshare: the job did not start: cannot pull {PRIVATE}: the pull failed "
        "(the engine's answer is in the unit owner's log)\n"
    )
    assert "unauthorized: *** is expired" in caplog.text  # the owner's log has the engine's answer
    assert PASSWORD not in caplog.text
    assert engine.created == []


def test_a_copy_here_without_the_pinned_digest_ends_the_job_unstarted_saying_why(server, tmp_path, engine, caplog):
    """The engine checks a pinned digest as it pulls; what it hands over is checked again."""
    engine.digests[PINNED] = OTHER_DIGEST
    allocation_id = server.assign(["train"], image=PINNED, registry=LOGIN)

    with caplog.at_level(logging.DEBUG):
        run(agent_on(server, tmp_path, engine, until=finished(server, allocation_id)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "start_failed"}
    assert "start" not in calls_about(server, allocation_id) and engine.created == []
    assert f"the image here for {PINNED} does not carry the digest it is pinned to" in server.log_text(allocation_id)
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    "registry",
    [None, {"username": "renter-bot"}, {"username": "renter-bot", "password": 42}, "renter-bot:secret"],
    ids=["missing", "no password", "not text", "not an object"],
)
def test_a_job_with_registry_auth_and_no_usable_credential_never_starts(server, tmp_path, engine, registry):
    allocation_id = server.assign(["train"], image=PRIVATE, registry=LOGIN)
    if registry is None:
        del server.registries[allocation_id]
    else:
        server.registries[allocation_id] = registry

    run(agent_on(server, tmp_path, engine, until=finished(server, allocation_id)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "secrets_unavailable"}
    assert calls_about(server, allocation_id) == ["secrets", "finish"]
    assert engine.pulls == [] and engine.created == []


def test_the_owners_registry_policy_refuses_before_the_credential_is_asked_for_or_anything_pulled(
    server, tmp_path, engine
):
    allocation_id = server.assign(["train"], image="registry.example.net/acme/private:1", registry=LOGIN)

    run(agent_on(server, tmp_path, engine, until=finished(server, allocation_id)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "refused:registry"}
    assert calls_about(server, allocation_id) == ["finish"]
    assert engine.pulls == []


def test_a_job_cancelled_while_its_image_is_pulled_never_starts(server, tmp_path, engine):
    engine.pull_release.clear()
    allocation_id = server.assign(["train"], image=PRIVATE, registry=LOGIN)

    def cancelled_during_the_pull(agent: Agent) -> bool:
        if engine.pulls and allocation_id not in server.finished:
            server.to_cancel.add(allocation_id)
        return finished(server, allocation_id)(agent)

    run(agent_on(server, tmp_path, engine, until=cancelled_during_the_pull, wait_pulls=False))
    engine.pull_release.set()

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "cancelled"}
    assert "start" not in calls_about(server, allocation_id) and engine.created == []


def test_a_long_pull_is_not_an_outage_of_the_start_call(server, tmp_path, engine):
    """The give-up time of the start counts from the end of the pull, however long it took."""
    engine.pull_release.clear()
    server.failures["/start"] = 1
    allocation_id = server.assign(["train"], image=PRIVATE, registry=LOGIN)
    clock = Clock()

    def pulled_after_two_minutes(agent: Agent) -> bool:
        if clock.now >= 2 * OPTIONS.start_give_up_s and not engine.pull_release.is_set():
            engine.pull_release.set()
            agent.allocations[allocation_id].pull.result(timeout=5)
        return bool(engine.created)

    run(agent_on(server, tmp_path, engine, until=pulled_after_two_minutes, clock=clock, wait_pulls=False))

    assert calls_about(server, allocation_id) == ["secrets", "start", "start"]
    assert server.started == [allocation_id]


@pytest.mark.parametrize(
    ("image", "registry", "pulled"),
    [
        (PUBLIC, None, False),  # as before: an image here is used as it is
        (PUBLIC, CREDENTIAL_OF_RENTER, True),  # the registry checks this renter's right to it
        (PINNED, CREDENTIAL_OF_RENTER, False),  # the digest here is the one the job pinned
    ],
)
def test_an_image_here_is_pulled_again_only_for_a_job_with_a_credential_unless_pinned(
    engine, tmp_path, image, registry, pulled
):
    engine.local_images.add(image)
    runtime = DockerRuntime(engine, IsolationConfig(runtime="docker"), tmp_path)

    digest = runtime.pull(job(image), registry).result(timeout=5)

    assert engine.pulls == ([image] if pulled else [])
    assert digest == digest_of(image)


def test_an_image_pulled_with_a_credential_is_used_by_no_job_without_a_pull_of_its_own(engine, tmp_path):
    engine.private_images[PRIVATE] = LOGIN
    runtime = DockerRuntime(engine, IsolationConfig(runtime="docker"), tmp_path, pulled=PulledImages(tmp_path))
    runtime.pull(job(PRIVATE), CREDENTIAL_OF_RENTER).result(timeout=5)

    with pytest.raises(StartFailed, match="the pull failed"):
        runtime.pull(job(PRIVATE, allocation="another-renters")).result(timeout=5)

    assert engine.pull_auth == [LOGIN, None]
    assert PASSWORD not in (tmp_path / "images.json").read_text()


def test_the_registry_password_is_masked_like_a_secret_and_never_shown():
    secrets = Secrets({"HF_TOKEN": "hf_value"}, CREDENTIAL_OF_RENTER)

    assert PASSWORD.encode() in masks(secrets) and b"renter-bot" not in masks(secrets)
    assert redact(f"denied for renter-bot:{PASSWORD}", secrets) == "denied for renter-bot:***"
    assert PASSWORD not in repr(secrets) + repr(CREDENTIAL_OF_RENTER)
