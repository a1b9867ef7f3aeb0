"""One job through a real Docker engine; skipped, saying why, where none answers.

Without NVIDIA's container toolkit the device request is left out, so the rest of the hardening
is still checked; set SHEDSHARE_TEST_GPU to a GPU UUID to pin that GPU as well.
"""

import os
import time
from typing import Any

import pytest

from nodes.agent.isolation import IsolationConfig
from nodes.agent.runtime import JobSpec, RuntimeUnavailable
from nodes.agent.runtime.docker import DockerRuntime, connect

IMAGE = os.environ.get("SHEDSHARE_TEST_IMAGE", "busybox:1.36")
PROBE = (
    "id -u; (touch /root-file 2>/dev/null && echo root-writable) || echo root-read-only; "
    "touch /scratch/x && echo scratch-writable; grep CapEff /proc/self/status; ls /sys/class/net; "
    "echo visible=$NVIDIA_VISIBLE_DEVICES; nvidia-smi -L 2>/dev/null || true"
)


class WithoutGpus:
    """The engine minus device requests, for machines without NVIDIA's container toolkit."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.images, self.networks, self.containers = client.images, client.networks, self

    def create(self, **kwargs: Any) -> Any:
        kwargs.pop("device_requests")
        return self._client.containers.create(**kwargs)

    def get(self, name: str) -> Any:
        return self._client.containers.get(name)


@pytest.fixture
def engine():
    try:
        client = connect()
    except RuntimeUnavailable as exc:
        pytest.skip(str(exc))
    try:
        client.images.pull(IMAGE)
    except Exception as exc:  # offline, or a registry that refuses us
        pytest.skip(f"Docker engine present but cannot pull {IMAGE}: {exc}")
    return client


def test_a_real_container_runs_as_nobody_read_only_without_capabilities_or_network(engine, tmp_path):
    gpu = os.environ.get("SHEDSHARE_TEST_GPU")
    runtime = DockerRuntime(engine if gpu else WithoutGpus(engine), IsolationConfig(runtime="docker"), tmp_path)
    spec = JobSpec(f"engine-test-{os.getpid()}", "job-1", IMAGE, ("sh", "-c", PROBE), (gpu or "GPU-none",))

    handle = runtime.start(spec)
    try:
        deadline = time.monotonic() + 60
        while (code := runtime.poll(handle)) is None:
            assert time.monotonic() < deadline, "the container did not exit"
            time.sleep(0.1)
    finally:
        runtime.cleanup(handle)

    output = handle.log_path.read_text()
    assert code == 0, output
    lines = output.split()
    assert lines[0] == "65534"
    assert "root-read-only" in lines and "scratch-writable" in lines
    assert "0000000000000000" in lines  # CapEff: no capability at all
    assert "eth0" not in lines and "lo" in lines
    assert f"visible={gpu or 'GPU-none'}" in lines
    if gpu:
        assert gpu in output  # nvidia-smi -L lists exactly the pinned GPU
        assert output.count("GPU ") == 1
