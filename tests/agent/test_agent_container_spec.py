import pytest

from nodes.agent.isolation import IsolationConfig
from nodes.agent.runtime import JobSpec
from nodes.agent.runtime.spec import GpuRequest, Host, SpecError, container_spec

ALLOCATION = "5f0c9a4e-1b2d-4c3e-8f6a-7b8c9d0e1f2a"
GPUS = ("GPU-aaa", "GPU-bbb")
CONFIG = IsolationConfig(
    scratch_mb=2048, tmp_mb=128, shm_mb=512, memory_mb_per_gpu=16384, cpus_per_gpu=3.5, pids_limit=1000
)


def job(isolation: str = "gpu", gpus: tuple[str, ...] = GPUS, **extra) -> JobSpec:
    return JobSpec(
        allocation_id=ALLOCATION,
        job_id="job-1",
        image="docker.io/library/python:3.12-slim",
        command=("python", "-c", "print(1)"),
        gpu_uuids=gpus,
        isolation=isolation,
        **extra,
    )


@pytest.mark.parametrize(
    ("isolation", "gpus"),
    [
        ("shared", ("GPU-aaa",)),
        ("mig", ("MIG-1c2d3e4f-0000-1111-2222-333344445555",)),
        ("gpu", GPUS),
        ("node", ("GPU-aaa", "GPU-bbb", "GPU-ccc", "GPU-ddd")),
    ],
)
def test_every_isolation_level_gets_exactly_its_devices_and_the_full_hardening(isolation, gpus):
    spec = container_spec(job(isolation, gpus), CONFIG)

    assert spec["device_requests"] == [GpuRequest(device_ids=gpus)]
    assert spec["device_requests"][0].driver == "nvidia"
    assert spec["device_requests"][0].capabilities == (("gpu",),)
    assert spec["environment"]["NVIDIA_VISIBLE_DEVICES"] == ",".join(gpus)
    assert spec["privileged"] is False
    assert spec["cap_drop"] == ["ALL"]
    assert spec["read_only"] is True
    assert spec["mem_limit"] == f"{16384 * len(gpus)}m"
    assert spec["nano_cpus"] == round(3.5 * len(gpus) * 1e9)


def test_the_job_runs_as_nobody_without_privileges_or_new_privileges():
    spec = container_spec(job(), CONFIG)

    assert spec["user"] == "65534:65534"
    assert spec["privileged"] is False
    assert spec["cap_drop"] == ["ALL"]
    assert "cap_add" not in spec
    assert spec["security_opt"] == ["no-new-privileges:true"]


def test_the_root_is_read_only_and_scratch_is_a_size_limited_tmpfs():
    spec = container_spec(job(), CONFIG)

    assert spec["read_only"] is True
    assert spec["tmpfs"]["/scratch"].startswith("size=2048m,")
    assert spec["tmpfs"]["/tmp"].startswith("size=128m,")  # noqa: S108 - the container's /tmp
    assert all("nosuid" in options and "nodev" in options for options in spec["tmpfs"].values())
    assert spec["working_dir"] == spec["environment"]["HOME"] == "/scratch"


def test_nothing_of_the_host_is_mounted_or_shared():
    spec = container_spec(job(), CONFIG)

    for key in ("volumes", "mounts", "devices", "pid_mode", "userns_mode", "volumes_from"):
        assert key not in spec
    assert spec["ipc_mode"] == "private"
    assert spec["use_config_proxy"] is False


def test_pids_memory_and_cpu_are_limited_per_gpu_with_no_swap():
    spec = container_spec(job(gpus=("GPU-aaa",)), CONFIG)

    assert spec["pids_limit"] == 1000
    assert spec["mem_limit"] == spec["memswap_limit"] == "16384m"
    assert spec["nano_cpus"] == 3_500_000_000
    assert spec["shm_size"] == "512m"


def test_a_job_without_egress_has_no_network():
    assert container_spec(job(network_egress=False), CONFIG)["network_mode"] == "none"


def test_a_job_allowed_egress_joins_the_units_own_bridge():
    assert container_spec(job(network_egress=True), CONFIG)["network_mode"] == "shedshare-egress"


def test_a_sandboxed_job_runs_under_the_sandbox_runtime_and_others_under_the_default():
    sandboxed = container_spec(job(sandboxed=True), IsolationConfig(sandbox_runtime="runsc"))
    plain = container_spec(job(), IsolationConfig(sandbox_runtime="runsc"))

    assert sandboxed["runtime"] == "runsc"
    assert "runtime" not in plain


def test_labels_name_and_environment_let_a_restarted_agent_find_its_container():
    spec = container_spec(job(), CONFIG)

    assert spec["labels"] == {"shedshare.allocation": ALLOCATION, "shedshare.job": "job-1"}
    assert spec["name"] == f"shedshare-{ALLOCATION}"
    assert spec["environment"]["SHEDSHARE_ALLOCATION_ID"] == ALLOCATION
    assert spec["environment"]["SHEDSHARE_JOB_ID"] == "job-1"


def test_the_job_runs_its_own_image_and_argv():
    spec = container_spec(job(), CONFIG)

    assert (spec["image"], spec["command"]) == ("docker.io/library/python:3.12-slim", ["python", "-c", "print(1)"])


@pytest.mark.parametrize(
    ("spec", "config", "complaint"),
    [
        (job(sandboxed=True), IsolationConfig(sandbox_runtime=""), "no sandbox_runtime"),
        (job(network_egress=True), IsolationConfig(egress_network=""), "allows no egress"),
        (job(network_egress=True), IsolationConfig(allow_egress=False), "allows no egress"),
        (job(), IsolationConfig(sandbox_all_jobs=True), "no sandbox_runtime"),
        (job(gpus=()), CONFIG, "without GPUs"),
        (job(isolation="confidential"), CONFIG, "unknown isolation level"),
    ],
)
def test_a_job_it_cannot_isolate_is_an_error_not_a_weaker_container(spec, config, complaint):
    with pytest.raises(SpecError, match=complaint):
        container_spec(spec, config)


@pytest.mark.parametrize(
    ("per_gpu", "gpus", "host_cpus", "expected"), [(4.0, 2, 2, 2.0), (0.5, 2, 16, 1.0), (4.0, 8, 48, 32.0)]
)
def test_the_cpu_limit_never_asks_for_more_cpus_than_the_machine_has(per_gpu, gpus, host_cpus, expected):
    """The engine refuses a container asking for more CPUs than the host has."""
    config = IsolationConfig(cpus_per_gpu=per_gpu)
    uuids = tuple(f"GPU-{i}" for i in range(gpus))
    spec = container_spec(job(gpus=uuids), config, Host(cpus=host_cpus))
    assert spec["nano_cpus"] == round(expected * 1e9)


def test_scratch_belongs_to_the_job_user_by_its_mount_and_may_hold_programs_while_tmp_may_not():
    """Ownership through the tmpfs options, not a mode runc 1.1 resets; exec on scratch only."""
    options = container_spec(job(), CONFIG)["tmpfs"]
    scratch, tmp = options["/scratch"].split(","), options["/tmp"].split(",")  # noqa: S108 - the container's own /tmp
    assert {"uid=65534", "gid=65534", "exec", "nosuid", "nodev"} <= set(scratch)
    assert "noexec" not in scratch
    assert "noexec" in tmp


def test_simulated_gpus_are_not_requested_from_the_engine():
    assert container_spec(job(), CONFIG, Host(gpus=False))["device_requests"] == []
    assert container_spec(job(), CONFIG, Host(gpus=True))["device_requests"]


def test_a_sandbox_keeps_the_jobs_process_limit_inside_and_a_wider_one_for_its_own_threads():
    config = IsolationConfig(sandbox_runtime="runsc", pids_limit=100)
    spec = container_spec(job(sandboxed=True), config)
    assert spec["ulimits"] == [{"name": "nproc", "soft": 100, "hard": 100}]
    assert spec["pids_limit"] > 100 * 8  # gVisor's host threads per process, measured about 9
    assert "ulimits" not in container_spec(job(), config)  # runc: nobody is shared by every job


def test_an_owner_may_sandbox_every_job():
    config = IsolationConfig(sandbox_runtime="runsc", sandbox_all_jobs=True)
    assert container_spec(job(sandboxed=False), config)["runtime"] == "runsc"


def test_the_jobs_variables_and_secrets_are_in_its_environment_but_never_override_the_agents():
    renters = {"EPOCHS": "3", "HOME": "/root", "SHEDSHARE_JOB_ID": "forged", "NVIDIA_VISIBLE_DEVICES": "all"}
    spec = job(env=renters, secrets=("HF_TOKEN", "NVIDIA_DRIVER_CAPABILITIES"))

    created = container_spec(spec, CONFIG, secrets={"HF_TOKEN": "hf_value", "NVIDIA_DRIVER_CAPABILITIES": "all"})

    assert created["environment"] == {
        "EPOCHS": "3",
        "HF_TOKEN": "hf_value",
        "NVIDIA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb",
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        "HOME": "/scratch",
        "SHEDSHARE_JOB_ID": "job-1",
        "SHEDSHARE_ALLOCATION_ID": ALLOCATION,
    }


def test_a_job_without_variables_gets_only_the_agents():
    assert set(container_spec(job(), CONFIG)["environment"]) == {
        "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "HOME", "SHEDSHARE_JOB_ID", "SHEDSHARE_ALLOCATION_ID",
    }  # fmt: skip
