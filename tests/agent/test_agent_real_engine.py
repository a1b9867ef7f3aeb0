# ruff: noqa: S108 - "/tmp" here is the container's own
"""The isolation promises, probed from inside jobs run by the agent's Docker runtime on a real
engine, under runc and under gVisor (every job sandboxed, as an owner's `sandbox_all_jobs` does).

Each probe's observation goes into the isolation table; with ISOLATION_REPORT set the module
writes it there at the end (into README.md between its markers, or a file of its own). A GPU
is pinned only where SHEDSHARE_TEST_GPU names one (a machine with NVIDIA's container toolkit).
"""

import contextlib
import os
import time
from pathlib import Path

import pytest

from nodes.agent.runtime import JobSpec
from nodes.agent.runtime.docker import DockerRuntime
from nodes.agent.runtime.sandbox import leftovers
from nodes.agent.runtime.spec import container_name
from tests.agent import engine as real
from tests.agent.isolation_table import Table

GPU = os.environ.get("SHEDSHARE_TEST_GPU", "")
PROBES = r"""
echo uid=$(id -u)
echo caps=$(grep CapEff /proc/self/status | cut -f2)
echo setuid_euid=$(/bin/euid)
(touch /probe 2>/dev/null && echo root=writable) || echo root=read-only
cp /bin/busybox /tmp/true 2>/dev/null; /tmp/true 2>/dev/null; echo tmp_exec_rc=$?
echo home=$HOME
cd && touch x && cp /bin/busybox ./true && ./true && echo scratch=writable-exec
dd if=/dev/zero of=$HOME/fill bs=1M count=100 2>/dev/null; echo scratch_mb=$(( $(wc -c < $HOME/fill) / 1048576 ))
rm -f $HOME/fill
echo interfaces=$(ls /sys/class/net | tr '\n' ' ')
(test -e /var/run/docker.sock || test -e /run/docker.sock) && echo docker_socket=present || echo docker_socket=absent
echo gpu_devices=$(ls /dev | grep nvidia | tr '\n' ' ')
echo mounts=$(awk '{print $2}' /proc/mounts | grep -v -E '^/(proc|dev|sys)(/|$)' | sort -u | tr '\n' ' ')
echo visible=$NVIDIA_VISIBLE_DEVICES
nvidia-smi -L 2>/dev/null || true
"""
# What a job may see mounted outside /proc, /dev and /sys: its image, its two tmpfs, the three
# files the engine writes for every container and the engine's init (read-only).
ALLOWED_MOUNTS = {"/", "/scratch", "/tmp", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/sbin/docker-init"}

table = Table(
    "isolation",
    {
        "user": "65534 (nobody)",
        "capabilities": "none (CapEff 0)",
        "setuid root binary": "runs as 65534 (no-new-privileges)",
        "root filesystem": "read-only",
        "/tmp": "not executable",
        "/scratch (HOME)": "writable and executable by the job",
        "scratch size": "capped (32 MiB here)",
        "network without egress": "loopback only",
        "a job serving ports reaches": "nothing: not the host, another job, nor the internet (the agent reaches it)",
        "Docker socket": "absent",
        "host mounts": "none",
        "GPU devices": "only the job's",
        "memory": "killed above the cap (128 MiB here)",
        "processes": "capped (48 here); the job goes on",
        "CPU": "the machine's CPUs at most",
        "leftovers after removal": "no container, no sandbox process",
    },
)


@pytest.fixture(scope="module")
def engine():
    client = real.client()
    yield client
    table.write()


@pytest.fixture(params=real.RUNTIMES)
def runtime_name(request, engine):
    real.require_runtime(engine, request.param)
    return request.param


@pytest.fixture
def runtime(engine, runtime_name, tmp_path) -> DockerRuntime:
    return real.runtime(engine, real.config(runtime_name), tmp_path)


def job(name: str, script: str) -> JobSpec:
    allocation = f"engine-{name}-{os.getpid()}-{time.monotonic_ns()}"
    return JobSpec(allocation, f"job-{name}", real.image(), ("sh", "-c", script), (GPU or "GPU-simulated",))


def run(runtime: DockerRuntime, spec: JobSpec) -> tuple[int, str]:
    handle = real.start(runtime, spec)
    try:
        code = real.wait_exit(runtime, handle)
    finally:
        runtime.cleanup(handle)
    return code, handle.log_path.read_text()


def test_a_job_sees_nothing_it_should_not(runtime, runtime_name, engine):
    """The hardening, probed from inside; the image is pulled for real from the local registry."""
    with contextlib.suppress(Exception):  # not there yet
        engine.images.remove(real.image(), force=True)
    code, output = run(runtime, job("probes", PROBES))

    assert code == 0, output
    seen = real.values(output)
    observe = table.observer(runtime_name)
    assert observe("user", seen["uid"]) == "65534"
    assert observe("capabilities", seen["caps"]) == "0000000000000000"
    assert observe("setuid root binary", f"runs as {seen['setuid_euid']}") == "runs as 65534"
    assert observe("root filesystem", seen["root"]) == "read-only"
    assert observe("/tmp", f"exec refused (exit {seen['tmp_exec_rc']})") == "exec refused (exit 126)"
    assert seen["home"] == "/scratch"
    assert observe("/scratch (HOME)", seen.get("scratch", "not writable")) == "writable-exec"
    assert int(observe("scratch size", seen["scratch_mb"])) <= 32
    observe("scratch size", f"a 100 MiB write stops at {seen['scratch_mb']} MiB")
    assert observe("network without egress", seen["interfaces"]) == "lo"
    assert observe("Docker socket", seen["docker_socket"]) == "absent"
    extra = sorted(set(seen["mounts"].split()) - ALLOWED_MOUNTS)
    assert observe("host mounts", " ".join(extra) or "none") == "none", seen["mounts"]
    devices = seen["gpu_devices"].split()
    if GPU:
        assert seen["visible"] == GPU
        assert GPU in output and output.count("GPU ") == 1  # nvidia-smi -L lists exactly the pinned GPU
        observe("GPU devices", f"{GPU} only (nvidia-smi lists 1 GPU)")
    else:
        assert devices == [], devices
        observe("GPU devices", "none (no GPU on this machine)")


def test_memory_over_the_cap_is_killed(runtime, runtime_name):
    code, output = run(runtime, job("memory", "dd if=/dev/zero of=/dev/null bs=400M count=1; echo dd_rc=$?"))

    seen = real.values(output)
    observe = table.observer(runtime_name)
    if "dd_rc" in seen:  # runc: the kernel kills the process that went over
        assert seen["dd_rc"] == "137", output
        observe("memory", "the process over the cap is killed (137); the job goes on")
    else:  # gVisor: the sandbox holds all the job's memory, so the job ends
        assert code == 137, output
        observe("memory", "the job is killed (137)")


def test_a_fork_bomb_meets_the_process_cap_and_the_job_goes_on(runtime, runtime_name):
    script = "sh -c 'for i in $(seq 200); do sleep 30 & done' 2>/dev/null; set -- /proc/[0-9]*; echo procs=$#"
    code, output = run(runtime, job("pids", script))

    assert code == 0, output  # not killed: under gVisor the host ceiling is wider than the job's
    procs = int(real.values(output)["procs"])
    table.observer(runtime_name)("processes", f"a 200-process fork bomb stops at {procs}; the job goes on")
    assert 10 < procs <= 48


def test_kernel_limits_are_set_and_nothing_is_left_after_a_kill(runtime, runtime_name, engine):
    """CPU, memory and pids limits as the kernel holds them for the container; then SIGTERM."""
    spec = job("limits", "sleep 60")
    handle = real.start(runtime, spec)
    try:
        real.wait_running(handle, runtime)
        cpus = float(engine.info()["NCPU"])
        host = handle.container.attrs["HostConfig"]
        assert host["NanoCpus"] == round(min(4.0, cpus) * 1e9)  # cpus_per_gpu 4 on a smaller machine
        quota, period = (
            cgroup(handle.container.id, "cpu", "cpu.cfs_quota_us"),
            cgroup(handle.container.id, "cpu", "cpu.cfs_period_us"),
        )
        if quota is not None and period is not None:
            assert int(quota) / int(period) == min(4.0, cpus)
            table.observer(runtime_name)("CPU", f"{int(quota) / int(period):g} of {cpus:g} CPUs (cgroup quota)")
        else:
            table.observer(runtime_name)("CPU", f"{host['NanoCpus'] / 1e9:g} of {cpus:g} CPUs (engine)")
        assert host["Memory"] == 128 * 2**20 and host["MemorySwap"] == host["Memory"]
        runtime.kill(handle)
        assert real.wait_exit(runtime, handle, timeout_s=60) in (143, 137)
    finally:
        runtime.cleanup(handle)
    gone = not engine.containers.list(all=True, filters={"name": container_name(spec.allocation_id)})
    left = leftovers(handle.container.id)
    table.observer(runtime_name)("leftovers after removal", "none" if gone and not left else f"{left}")
    assert gone and not left


def cgroup(container_id: str, controller: str, name: str) -> str | None:
    """A cgroup v1 file of the container as the host sees it (cgroupfs driver), or None."""
    for base in (Path("/sys/fs/cgroup", controller, "docker", container_id),):
        if (base / name).exists():
            return (base / name).read_text().strip()
    return None


def test_a_jobs_port_is_reached_by_the_agent_alone(runtime, runtime_name, engine):
    """A job that serves a port and may not reach out gets a network of its own: the agent (on the
    host) reaches its port there; the job reaches neither the host's services nor another job's
    port, nor anything beyond; its network goes with it."""
    import dataclasses
    import socket
    import threading

    from nodes.agent.runtime.spec import job_network

    serve = "mkdir -p $HOME/www && echo served-by-the-job > $HOME/www/index.html && exec httpd -f -p 8080 -h $HOME/www"
    first = dataclasses.replace(job("ports", serve), ports=(8080,))
    second = dataclasses.replace(job("ports2", serve), ports=(8080,))
    listener = socket.create_server(("0.0.0.0", 0))  # noqa: S104 - a host service the job must not reach

    def accept_all() -> None:
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                listener.accept()[0].close()

    threading.Thread(target=accept_all, daemon=True).start()
    handles = [real.start(runtime, spec) for spec in (first, second)]
    try:
        for handle in handles:
            real.wait_running(handle, runtime)
        host, port = runtime.port_address(handles[0], 8080)

        def fetch() -> bytes:
            with socket.create_connection((host, port), timeout=5) as conn:
                conn.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
                return b"".join(iter(lambda: conn.recv(4096), b""))

        deadline = time.monotonic() + 60
        while True:
            try:
                answer = fetch()
                break
            except OSError:
                assert time.monotonic() < deadline, "the job's port did not answer"
                time.sleep(0.2)
        assert b"served-by-the-job" in answer
        gateway = engine.networks.get(job_network(first.allocation_id)).attrs["IPAM"]["Config"][0]["Gateway"]
        probes = {
            "host": f"{gateway} {listener.getsockname()[1]}",
            "other_job": f"{runtime.port_address(handles[1], 8080)[0]} 8080",
            "internet": "1.1.1.1 80",
        }
        container = engine.containers.get(container_name(first.allocation_id))
        reached = []
        for what, target in probes.items():
            _, output = container.exec_run(["sh", "-c", f"echo x | nc -w 3 {target} && echo REACHED"])
            if b"REACHED" in output:
                reached.append(what)
        observed = "nothing: not the host, another job, nor the internet (the agent reaches it)"
        table.observer(runtime_name)("a job serving ports reaches", ", ".join(reached) if reached else observed)
        assert reached == [], f"{runtime_name}: the job reached {reached}"
    finally:
        for handle in handles:
            runtime.kill(handle)
            real.wait_exit(runtime, handle)
            runtime.cleanup(handle)
        listener.close()
    assert not engine.networks.list(names=[job_network(first.allocation_id)])
