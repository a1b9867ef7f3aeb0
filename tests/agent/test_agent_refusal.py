"""The agent refuses assignments its unit cannot honour, whatever the server sent."""

import time

import pytest

from nodes.agent import gpus
from nodes.agent.client import AgentClient
from nodes.agent.isolation import LEVELS, IsolationConfig
from nodes.agent.loop import Agent, Options
from nodes.agent.refusal import LocalPolicy, policy_for, refusal
from nodes.agent.runtime import JobSpec
from nodes.agent.runtime.process import ProcessRuntime
from tests.agent.fakes import CREDENTIAL, HONOURS_ALL, UNIT_ID

INVENTORY = gpus.simulate("4xH100-80GB", UNIT_ID)
UUIDS = tuple(gpu.uuid for gpu in INVENTORY)
FAST = Options(usage_interval_s=0.2, max_jobs=1, tick_s=0.02, poll_wait_s=0, error_base_s=0.05)


def job(isolation="gpu", uuids=UUIDS[:1], countries=(), **extra) -> JobSpec:
    return JobSpec("a-1", "j-1", "img", ("true",), uuids, isolation, tuple(countries), **extra)


def run_agent(server, tmp_path, policy: LocalPolicy = HONOURS_ALL) -> None:
    client = AgentClient("http://shed.test", CREDENTIAL, transport=server.transport())
    runtime = ProcessRuntime(tmp_path / "work", tmp_path / "logs", kill_grace_s=1.0)
    deadline = time.monotonic() + 20

    def sleep(seconds: float) -> None:
        assert time.monotonic() < deadline, "the agent loop did not finish in time"
        time.sleep(seconds)

    Agent(client, runtime, server.inventory, FAST, sleep=sleep, policy=policy).run()


@pytest.mark.parametrize(
    ("countries", "here", "refused"),
    [((), None, False), (("DE", "FR"), "DE", False), (("FR",), "DE", True), (("DE",), None, True)],
)
def test_residency_is_checked_against_the_units_own_country(countries, here, refused):
    policy = LocalPolicy(country=here, isolation_levels=frozenset(LEVELS))

    assert refusal(job(countries=countries), INVENTORY, policy) == ("refused:residency" if refused else None)


def test_a_level_the_owner_does_not_offer_is_refused():
    policy = LocalPolicy(isolation_levels=frozenset({"shared", "gpu"}))

    assert refusal(job("mig"), INVENTORY, policy) == "refused:isolation"
    assert refusal(job("shared"), INVENTORY, policy) is None


def test_a_whole_gpu_job_given_a_mig_instance_is_refused():
    policy = LocalPolicy(isolation_levels=frozenset(LEVELS))
    mig = ("MIG-1c2d3e4f-0000-1111-2222-333344445555",)

    assert refusal(job("gpu", mig), INVENTORY, policy) == "refused:isolation"
    assert refusal(job("mig", mig), INVENTORY, policy) is None


def test_a_node_job_must_hold_every_gpu_of_the_unit():
    policy = LocalPolicy(isolation_levels=frozenset(LEVELS))

    assert refusal(job("node", UUIDS[:3]), INVENTORY, policy) == "refused:isolation"
    assert refusal(job("node", UUIDS), INVENTORY, policy) is None


def test_sandbox_and_egress_need_the_unit_to_offer_them():
    policy = LocalPolicy(isolation_levels=frozenset(LEVELS))

    assert refusal(job(sandboxed=True), INVENTORY, policy) == "refused:sandbox"
    assert refusal(job(network_egress=True), INVENTORY, policy) == "refused:egress"


def test_the_process_runtime_honours_nothing_unless_it_is_a_dev_runtime():
    strict = policy_for(IsolationConfig(runtime="process", country="DE"), INVENTORY)
    dev = policy_for(IsolationConfig(runtime="process", allow_unisolated_dev_runtime=True), INVENTORY)

    assert strict.isolation_levels == frozenset()
    assert dev.isolation_levels == frozenset(LEVELS) and dev.sandbox


def test_the_docker_runtime_offers_mig_only_with_mig_instances_and_sandbox_only_when_configured():
    plain = policy_for(IsolationConfig(runtime="docker", sandbox_runtime=""), INVENTORY)
    mig = gpus.MigInstance(uuid="MIG-x-1", profile="3g.40gb", memory_mb=40960)
    with_mig = [gpus.Gpu(index=0, uuid="GPU-x", model="A100", vram_mb=81920, mig_mode=True, mig_instances=(mig,))]
    chosen = IsolationConfig(runtime="docker", isolation_levels=("gpu",), sandbox_runtime="runsc")

    assert plain.isolation_levels == frozenset({"shared", "gpu", "node"}) and not plain.sandbox
    assert "mig" in policy_for(IsolationConfig(runtime="docker"), with_mig).isolation_levels
    assert policy_for(chosen, INVENTORY).isolation_levels == frozenset({"gpu"})
    assert policy_for(chosen, INVENTORY).sandbox


def assign_touching(server, tmp_path, **job_fields) -> tuple[str, object]:
    marker = tmp_path / "ran"
    allocation_id = server.assign(["touch", str(marker)], gpu_count=1)
    server.queue[-1]["job"].update(job_fields)
    return allocation_id, marker


def test_an_assignment_outside_the_units_jurisdiction_is_refused_and_never_started(server, tmp_path):
    allocation_id, marker = assign_touching(server, tmp_path, allowed_countries=["FR", "BE"])

    run_agent(server, tmp_path)

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "refused:residency"}
    assert server.started == []
    assert not marker.exists()
    assert not server.samples[allocation_id]


def test_a_restricted_assignment_is_refused_by_an_agent_without_a_configured_country(server, tmp_path):
    allocation_id, marker = assign_touching(server, tmp_path, allowed_countries=["DE"])

    run_agent(server, tmp_path, LocalPolicy(country=None, isolation_levels=frozenset(LEVELS)))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "refused:residency"}
    assert not marker.exists()


def test_an_isolation_level_the_unit_cannot_honour_is_refused_and_never_started(server, tmp_path):
    allocation_id, marker = assign_touching(server, tmp_path, isolation="mig")
    policy = LocalPolicy(country="DE", isolation_levels=frozenset({"shared", "gpu", "node"}))

    run_agent(server, tmp_path, policy)

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "refused:isolation"}
    assert server.started == []
    assert not marker.exists()


def test_a_strict_agent_on_the_process_runtime_refuses_everything(server, tmp_path):
    allocation_id, marker = assign_touching(server, tmp_path, allowed_countries=[])

    run_agent(server, tmp_path, policy_for(IsolationConfig(runtime="process", country="DE"), INVENTORY))

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "refused:isolation"}
    assert not marker.exists()


def test_gpus_that_are_not_this_units_are_refused_and_never_started(server, tmp_path):
    allocation_id, marker = assign_touching(server, tmp_path)
    server.queue[-1]["gpus"] = [{"index": 0, "uuid": "GPU-of-somebody-else"}]

    run_agent(server, tmp_path)

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "refused:devices"}
    assert server.started == []
    assert not marker.exists()


def test_a_node_assignment_missing_one_of_the_units_gpus_is_refused(server, tmp_path):
    allocation_id, marker = assign_touching(server, tmp_path, isolation="node")

    run_agent(server, tmp_path)

    assert server.finished[allocation_id] == {"exit_code": None, "reason": "refused:isolation"}
    assert not marker.exists()


def test_an_assignment_the_unit_can_honour_still_runs(server, tmp_path):
    allocation_id, marker = assign_touching(server, tmp_path, isolation="node")
    server.queue[-1]["gpus"] = [{"index": g.index, "uuid": g.uuid} for g in server.inventory]

    run_agent(server, tmp_path)

    assert server.finished[allocation_id] == {"exit_code": 0, "reason": "exited"}
    assert marker.exists()
