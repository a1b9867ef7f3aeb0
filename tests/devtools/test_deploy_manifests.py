"""The Kubernetes manifests (docker/deploy/) as kubectl renders them: every queue has its
workers, the placement shards add up, every command exists, every pod is locked down, and every
setting they pass is one the code reads. (.ci/run validates them against the API's schemas.)

They need kubectl; without one they skip, unless SHEDSHARE_REQUIRE_KUBECTL=1 says they must run."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import get_commands
from django.urls import resolve

from tests.conftest import child_environ

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "docker" / "deploy"
KUSTOMIZATIONS = sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))
KUBECTL = shutil.which("kubectl")

if KUBECTL is None:
    if os.environ.get("SHEDSHARE_REQUIRE_KUBECTL") == "1":
        raise RuntimeError("SHEDSHARE_REQUIRE_KUBECTL=1, but there is no kubectl on PATH")
    pytestmark = pytest.mark.skip(reason="no kubectl to render the manifests")


def render(kustomization: Path) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(kustomization)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda path: str(path.relative_to(DEPLOY)))
def objects(request) -> list[dict]:
    return render(request.param)


def pod_specs(objects) -> dict[str, dict]:
    return {
        obj["metadata"]["name"]: obj["spec"]["template"]["spec"] for obj in objects if "template" in obj.get("spec", {})
    }


def containers(objects):
    for name, spec in pod_specs(objects).items():
        for container in spec["containers"]:
            yield name, spec, container


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_there_is_a_base_and_a_production_overlay():
    assert {str(path.relative_to(DEPLOY)) for path in KUSTOMIZATIONS} >= {"base", "overlays/production"}


def test_every_queue_has_workers_and_every_worker_a_declared_queue(objects):
    declared = {queue.name for queue in settings.CELERY_TASK_QUEUES}
    consumed = set()
    for _, _, container in containers(objects):
        command = container["command"]
        if command[:3] == ["celery", "-A", "marketplace.celery"] and command[3] == "worker":
            queues = option(command, "--queues")
            assert queues, f"{container['name']}: a worker without --queues takes every queue"
            consumed |= set(queues.split(","))
    assert consumed == declared


def test_the_placement_shards_add_up(objects):
    [placement] = [obj for obj in objects if obj["kind"] == "StatefulSet"]
    [container] = placement["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    processes = int(env["PLACEMENT_WORKER_PROCESSES"]["value"])

    assert option(container["command"], "--queues") == "placement"
    assert option(container["command"], "--concurrency") == str(processes)
    assert int(env["PLACEMENT_SHARDS"]["value"]) == placement["spec"]["replicas"] * processes
    assert env["PLACEMENT_WORKER"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_there_is_exactly_one_beat_and_it_is_never_two_during_a_rollout(objects):
    beats = [
        obj
        for obj in objects
        if obj["kind"] in {"Deployment", "StatefulSet"}
        and "beat" in obj["spec"]["template"]["spec"]["containers"][0]["command"]
    ]
    assert [(beat["kind"], beat["spec"]["replicas"], beat["spec"]["strategy"]) for beat in beats] == [
        ("Deployment", 1, {"type": "Recreate"})
    ]


def test_every_command_the_pods_run_exists(objects):
    from marketplace.celery import app

    for name, _, container in containers(objects):
        command = container["command"]
        if command[0] == "gunicorn":
            assert command[1] == "marketplace.asgi:application"
            assert option(command, "--worker-class") == "marketplace.kernel.gunicorn.Worker"
        elif command[0] == "celery":
            assert (command[2], command[3]) == ("marketplace.celery", command[3])
            assert command[3] in {"worker", "beat"} and app.main == "shedshare"
        else:
            assert command[:2] == ["python", "manage.py"], name
            assert command[2] in get_commands()


def test_every_pod_runs_locked_down_with_resources_requested(objects):
    for name, spec, container in containers(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        assert "memory" in container["resources"]["limits"], name
        # The read-only root leaves /tmp (an emptyDir) for the data folder and beat's schedule.
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], name  # noqa: S108 - in the pod


def test_the_probes_reach_views_answered_over_plain_http():
    exempt = subprocess.run(
        [sys.executable, "-c", "import marketplace.settings.production as s; print(*s.SECURE_REDIRECT_EXEMPT)"],
        env={**child_environ(), "DEBUG": "false", "SECRET_KEY": "x" * 50},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for objects in map(render, KUSTOMIZATIONS):
        for name, _, container in containers(objects):
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in container:
                    path = container[kind]["httpGet"]["path"].lstrip("/").partition("?")[0]
                    assert any(re.search(pattern, path) for pattern in exempt), (name, kind, path)
                    assert resolve(f"/{path}")


def setting_names() -> set[str]:
    sources = [*(REPO / "marketplace" / "settings").glob("*.py"), REPO / "marketplace" / "asgi.py"]
    text = "\n".join(path.read_text() for path in sources)
    return set(re.findall(r'env_\w+\(\s*"([A-Z0-9_]+)"', text)) | set(
        re.findall(r'os\.environ\.setdefault\("(\w+)"', text)
    )


def test_every_setting_the_manifests_pass_is_one_the_code_reads(objects):
    known = setting_names() | {"CELERY_BROKER_URL", "REDIS_URL", "CACHE_URL", "DATABASE_URL"}
    known |= {"PROMETHEUS_MULTIPROC_DIR"}  # read by prometheus_client itself (README "Operations")
    passed = set()
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            passed |= set(obj["data"])
    for _, _, container in containers(objects):
        passed |= {item["name"] for item in container.get("env", [])}
    passed |= set(yaml.safe_load((DEPLOY / "secret.example.yaml").read_text())["stringData"])
    assert passed - known == set()


def test_the_migration_is_applied_alone_with_its_settings(objects):
    # README "Kubernetes": kubectl apply -k ... -l 'app.kubernetes.io/component in (settings,migrate)'
    chosen = sorted(
        obj["kind"]
        for obj in objects
        if obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") in {"settings", "migrate"}
    )
    assert chosen == ["ConfigMap", "Job"]
    [job] = [obj for obj in objects if obj["kind"] == "Job"]
    [config] = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]


def test_the_agents_streams_and_jobs_services_go_to_the_connection_servers(objects):
    routes = {}
    for ingress in (obj for obj in objects if obj["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                routes[path["path"]] = (path["backend"]["service"]["name"], ingress["metadata"]["annotations"])
    assert routes["/"][0] == "shedshare-web"
    for path in ("/api/agent/v1/stream", "/services/"):
        service, annotations = routes[path]
        assert service == "shedshare-streams"
        assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
