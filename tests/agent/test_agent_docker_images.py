"""The Docker runtime's images: a size cap, and pruning of what the agent pulled once unused."""

import pytest

from nodes.agent.images import ImagePolicy
from nodes.agent.isolation import IsolationConfig
from nodes.agent.runtime import StartFailed
from nodes.agent.runtime.docker import DockerRuntime
from nodes.agent.runtime.image_store import PulledImages
from tests.agent.docker_fakes import FakeDocker
from tests.agent.test_agent_docker_runtime import Clock, job, wait_for

HOUR = 3600.0
GIB = 2**30


@pytest.fixture
def engine():
    return FakeDocker()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def wall():
    return Clock()


def runtime_with(engine, clock, wall, tmp_path, **policy) -> DockerRuntime:
    pulled = PulledImages(tmp_path / "state", wall=wall)
    images = ImagePolicy(**policy)
    return DockerRuntime(
        engine,
        IsolationConfig(runtime="docker"),
        tmp_path / "logs",
        clock=clock,
        images=images,
        pulled=pulled,
        wall=wall,
    )


def pulled_and_started(runtime, image: str):
    runtime.pull(job(image)).result(timeout=5)
    return runtime.start(job(image))


def test_a_pulled_image_over_the_cap_is_refused_removed_and_the_refusal_names_the_rule(engine, clock, wall, tmp_path):
    engine.image_sizes["ghcr.io/acme/huge:1"] = 40 * GIB
    runtime = runtime_with(engine, clock, wall, tmp_path, image_max_mb=32768)

    with pytest.raises(StartFailed) as refused:
        runtime.pull(job("ghcr.io/acme/huge:1")).result(timeout=5)

    assert str(refused.value) == "rule image_max_mb: the image is 40960 MiB, over this unit's cap of 32768 MiB"
    assert engine.removed_images == ["ghcr.io/acme/huge:1"]
    assert runtime.pulled.images == {}


def test_an_image_already_here_over_the_cap_is_refused_but_left_alone(engine, clock, wall, tmp_path):
    engine.image_sizes["python:3.12-slim"] = 2 * GIB  # the owner's own image
    runtime = runtime_with(engine, clock, wall, tmp_path, image_max_mb=1024)

    with pytest.raises(StartFailed, match="rule image_max_mb"):
        runtime.pull(job("python:3.12-slim")).result(timeout=5)

    assert engine.pulls == [] and engine.removed_images == []


def test_an_image_under_the_cap_runs_and_is_recorded_as_pulled_by_the_agent(engine, clock, wall, tmp_path):
    runtime = runtime_with(engine, clock, wall, tmp_path)

    pulled_and_started(runtime, "ghcr.io/acme/train:1")

    assert engine.created[0].status == "running"
    assert set(runtime.pulled.images) == {"ghcr.io/acme/train:1"}
    assert set(PulledImages(tmp_path / "state").images) == {"ghcr.io/acme/train:1"}  # kept on disk


def pulled_then_finished(runtime, engine, image: str) -> None:
    handle = pulled_and_started(runtime, image)
    engine.created[-1].exit(0)
    assert runtime.poll(handle) == 0
    runtime.cleanup(handle)


def test_an_unused_pulled_image_is_pruned_after_the_keep_time_and_the_owners_images_never(
    engine, clock, wall, tmp_path
):
    runtime = runtime_with(engine, clock, wall, tmp_path, image_keep_hours=24)
    pulled_then_finished(runtime, engine, "ghcr.io/acme/train:1")

    wall.now += 23 * HOUR
    assert runtime.prune() == []
    wall.now += 2 * HOUR
    assert runtime.prune() == ["ghcr.io/acme/train:1"]

    assert engine.removed_images == ["ghcr.io/acme/train:1"]
    assert "python:3.12-slim" in engine.local_images  # there before the agent: not the agent's to remove
    assert runtime.pulled.images == {}


def test_an_image_a_container_still_uses_is_kept_however_old(engine, clock, wall, tmp_path):
    runtime = runtime_with(engine, clock, wall, tmp_path, image_keep_hours=1)
    handle = pulled_and_started(runtime, "ghcr.io/acme/train:1")

    wall.now += 10 * HOUR
    assert runtime.prune() == []
    engine.created[0].exit(0)
    runtime.poll(handle)
    runtime.cleanup(handle)
    wall.now += 0.5 * HOUR
    assert runtime.prune() == []  # it was in use until just now
    wall.now += 1 * HOUR
    assert runtime.prune() == ["ghcr.io/acme/train:1"]


def test_beyond_the_disk_budget_the_least_recently_used_go_first(engine, clock, wall, tmp_path):
    for name in ("ghcr.io/a/old:1", "ghcr.io/a/mid:1", "ghcr.io/a/new:1"):
        engine.image_sizes[name] = 3 * GIB
    runtime = runtime_with(engine, clock, wall, tmp_path, image_disk_mb=7 * 1024)
    for name in ("ghcr.io/a/old:1", "ghcr.io/a/mid:1", "ghcr.io/a/new:1"):
        pulled_then_finished(runtime, engine, name)
        wall.now += 60

    assert runtime.prune() == ["ghcr.io/a/old:1"]
    assert set(runtime.pulled.images) == {"ghcr.io/a/mid:1", "ghcr.io/a/new:1"}


def test_housekeeping_prunes_in_the_background_once_per_interval(engine, clock, wall, tmp_path):
    runtime = runtime_with(engine, clock, wall, tmp_path, image_keep_hours=1)
    pulled_then_finished(runtime, engine, "ghcr.io/acme/train:1")
    wall.now += 2 * HOUR

    runtime.housekeep()
    wait_for(lambda: runtime._pruning.done())
    assert engine.removed_images == ["ghcr.io/acme/train:1"]

    pulled_then_finished(runtime, engine, "ghcr.io/acme/other:1")
    wall.now += 2 * HOUR
    first = runtime._pruning
    runtime.housekeep()
    assert runtime._pruning is first  # not due yet
    clock.now += 600
    runtime.housekeep()
    wait_for(lambda: runtime._pruning is not first and runtime._pruning.done())
    assert engine.removed_images == ["ghcr.io/acme/train:1", "ghcr.io/acme/other:1"]


def test_an_image_pulled_for_a_job_that_never_started_is_still_recorded_and_pruned(engine, clock, wall, tmp_path):
    """Its job was cancelled during the pull: the agent no longer waits for it, the pull goes on."""
    runtime = runtime_with(engine, clock, wall, tmp_path, image_keep_hours=1)

    runtime.pull(job("ghcr.io/acme/train:1")).result(timeout=5)
    wall.now += 2 * HOUR

    assert runtime.prune() == ["ghcr.io/acme/train:1"]
    assert engine.created == []
