"""The whole loop through real containers: web server, Celery worker and an agent with
`--runtime docker` on a real engine; the job's image is pulled from a local registry.

Needs the engine and registry of `docker/engine.sh up` (it skips without them, and fails in CI
where SHEDSHARE_REQUIRE_ENGINE=1). The timings it measures are printed as one JSON line and,
with CONTAINER_E2E_REPORT set, written there.
"""

import contextlib
import json
import os
import signal
import time
from datetime import datetime

import pytest
from django.db.models import Sum
from docker.errors import NotFound

from billing.models import LedgerTransaction
from billing.services import wallet_credit_promotional
from billing.wallet import WALLET_EXHAUSTED
from marketplace.accounts.services import api_key_create
from marketplace.devtools import devstack
from marketplace.jobs.models import Allocation
from nodes.models import Unit
from nodes.services import unit_register
from tests.agent import engine as real
from tests.conftest import user_make
from tests.e2e import Renter, free_port, stack_start, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
PRICE_PER_SECOND = 2_000_000 / 3600  # the default price per GPU-hour, in micro-units


@pytest.fixture
def stack(tmp_path):
    registry = os.environ.get("SHEDSHARE_TEST_REGISTRY", "127.0.0.1:5000")
    stack = stack_start(
        tmp_path,
        port=free_port(),
        JOB_IMAGE_PRIVATE_REGISTRIES=registry,
        USAGE_POSTING_INTERVAL_S="0",  # each report posted as it comes, and the wallet checked (no beat here)
        WALLET_MIN_RUN_S="65",
    )
    stack.registry = registry
    yield stack
    stack.stop_all()


def start_agent(stack, config: str, tmp_path) -> None:
    stack.start(
        "agent",
        devstack.agent_argv("run", "--config", config, "--simulate", "2xH100-80GB", "--runtime", "docker",
                            "--state-dir", str(tmp_path / "agent" / "state"), "--usage-interval", "1"),
        SHEDSHARE_AGENT_REGISTRIES=stack.registry,
        SHEDSHARE_AGENT_REGISTRY_MIRRORS=stack.registry,
        SHEDSHARE_AGENT_MEMORY_MB_PER_GPU="256",
    )  # fmt: skip


def containers_of(engine, job_id: str) -> list:
    """The job's containers, inspected; one removed between the listing and its inspection (the
    SDK inspects each) is asked for again."""
    while True:
        try:
            return engine.containers.list(all=True, filters={"label": f"shedshare.job={job_id}"})
        except NotFound:
            continue


def started_after(engine, job_id: str, submitted: float) -> float:
    """Seconds from the submit (Unix time) to the job's container starting, as the engine says."""

    def started() -> float | None:
        for container in containers_of(engine, job_id):
            at = container.attrs["State"].get("StartedAt", "")
            if at and not at.startswith("0001"):
                head, _, fraction = at.rstrip("Z").partition(".")
                return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}+00:00").timestamp()
        return None

    return round(wait_until(started, timeout=120, interval=0.05, what=f"job {job_id}'s container") - submitted, 2)


def test_jobs_run_in_real_containers_from_submit_to_the_bill(stack, tmp_path):
    engine = real.client()
    image = real.image()
    owner, renter, frugal = user_make("olga-owner"), user_make("ravi-renter"), user_make("fay-frugal")
    unit, token = unit_register(owner=owner, name="Container shed", country="DE")
    wallet_credit_promotional(user=renter, amount_micros=50_000_000, key="e2e-containers")
    # Enough to be placed (65 s of one GPU) and then to run only a few seconds above the floor.
    wallet_credit_promotional(user=frugal, amount_micros=40_000, key="e2e-frugal")
    shopper = Renter(stack.base_url, api_key_create(user=renter, name="e2e")[1])
    config = str(tmp_path / "agent" / "agent.json")
    enrolled = stack.run(devstack.agent_argv("enrol", "--url", stack.base_url, "--token", token, "--config", config,
                                             "--country", "DE"))  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
    with contextlib.suppress(Exception):  # not there
        engine.images.remove(image, force=True)  # the first job pulls it for real
    start_agent(stack, config, tmp_path)
    timings = {}

    def logs() -> str:
        return "\n".join(f"===== {name}\n{stack.log(name)[-5000:]}" for name in ("web", "worker", "agent"))

    def running(job_id: str) -> dict:
        return wait_until(lambda: (job := shopper.job(job_id))["state"] == "running" and job, timeout=120,
                          what=lambda: f"job {job_id} running\n{logs()}")  # fmt: skip

    def log_text(job_id: str) -> str:
        return shopper.http.get(f"/api/v1/jobs/{job_id}/logs", headers={"Accept": "text/plain"}).text

    try:
        wait_until(lambda: Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE, timeout=60,
                   what=lambda: f"the unit online\n{logs()}")  # fmt: skip

        # 1. Pulled from the local registry, run, logged, metered, billed.
        submitted, submitted_at = time.monotonic(), time.time()
        first = shopper.submit(image=image, command=["sh", "-c", "echo hello from a container; id -u; sleep 2"],
                               gpu_count=1, jurisdictions=["DE"])  # fmt: skip
        timings["submit_to_container_started_s_with_pull"] = started_after(engine, first["id"], submitted_at)
        first = shopper.wait_final(first["id"], timeout=180)
        assert first["state"] == "succeeded", logs()
        ended = time.monotonic()
        allocation = Allocation.objects.get(job_id=first["id"])
        used_ms = allocation.usage_samples.aggregate(total=Sum("gpu_ms"))["total"]
        assert 2000 <= used_ms <= (ended - submitted) * 1000
        expected = used_ms * allocation.price_per_gpu_hour_micros // 3_600_000
        wait_until(lambda: round(float(shopper.job(first["id"])["usage"]["cost"]) * 1e6) == expected, timeout=30,
                   what="the usage charge")  # fmt: skip
        timings["exit_to_billed_s"] = round(time.monotonic() - ended, 2)
        assert LedgerTransaction.objects.filter(allocation=allocation, kind="usage").exists()
        output = wait_until(lambda: "hello from a container" in (text := log_text(first["id"])) and text,
                            timeout=30, what="the job's log")  # fmt: skip
        assert "65534" in output.split()
        assert containers_of(engine, first["id"]) == []  # removed with its scratch
        assert "pull" in stack.log("agent") or engine.images.get(image)

        # 2. The image is local now: the start alone.
        submitted_at = time.time()
        second = shopper.submit(image=image, command=["sh", "-c", "sleep 2"], gpu_count=1, jurisdictions=["DE"])
        timings["submit_to_container_started_s_image_local"] = started_after(engine, second["id"], submitted_at)
        second = shopper.wait_final(second["id"], timeout=120)
        assert second["state"] == "succeeded", logs()

        # 3. Cancel: SIGTERM to the container's processes, then it is removed.
        doomed = shopper.submit(image=image, command=["sh", "-c", "echo waiting; sleep 300"], gpu_count=1)
        running(doomed["id"])
        assert shopper.http.post(f"/api/v1/jobs/{doomed['id']}/cancel").status_code == 200
        assert shopper.wait_final(doomed["id"], timeout=60)["state"] == "cancelled"
        wait_until(lambda: containers_of(engine, doomed["id"]) == [], timeout=60, what="the cancelled container gone")

        # 4. The agent dies mid-job: the restarted agent adopts the running container (not a
        #    second run: "tick 0" once) and the job is billed once.
        ticking = shopper.submit(
            image=image, gpu_count=1,
            command=["sh", "-c", "i=0; while [ $i -lt 10 ]; do echo tick $i; i=$((i+1)); sleep 1; done"],
        )  # fmt: skip
        running(ticking["id"])
        began = time.monotonic()
        container = wait_until(lambda: (found := containers_of(engine, ticking["id"])) and found[0], timeout=60,
                               what="the job's container")  # fmt: skip
        wait_until(lambda: b"tick 1" in container.logs(), timeout=60, what="the job ticking")
        stack.signal("agent", signal.SIGKILL)
        stack.processes.pop("agent").wait()
        assert engine.containers.get(container.id).status == "running"  # the job goes on without its agent
        start_agent(stack, config, tmp_path)
        ticking = shopper.wait_final(ticking["id"], timeout=120)
        took_ms = (time.monotonic() - began) * 1000 + 2000  # and up to the 2 s before `began`
        assert ticking["state"] == "succeeded", logs()
        assert "event=job_adopted" in stack.log("agent"), logs()
        text = wait_until(lambda: "tick 9" in (t := log_text(ticking["id"])) and t, timeout=30, what="all ticks")
        assert text.count("tick 0") == 1, text
        allocation = Allocation.objects.get(job_id=ticking["id"])
        used_ms = allocation.usage_samples.aggregate(total=Sum("gpu_ms"))["total"]
        assert 9000 <= used_ms <= took_ms, (used_ms, took_ms)  # the time away billed, and once

        # 5. The wallet floor stops a job: its container is stopped and removed.
        frugal_shopper = Renter(stack.base_url, api_key_create(user=frugal, name="e2e")[1])
        broke = frugal_shopper.submit(image=image, command=["sh", "-c", "sleep 300"], gpu_count=1)
        broke = frugal_shopper.wait_final(broke["id"], timeout=120)
        assert broke["state"] == "failed" and broke["failure_reason"] == WALLET_EXHAUSTED, broke
        wait_until(lambda: containers_of(engine, broke["id"]) == [], timeout=60, what="the stopped container gone")

        # 6. Preemption: an on-demand job needs the GPUs an interruptible one holds. The notice is
        #    SIGTERM; this job ignores it (after saying so), so the grace runs out and SIGKILL ends it.
        spot = shopper.submit(
            image=image, gpu_count=2, interruptible=True, restartable=True,
            command=["sh", "-c", "trap 'echo notice' TERM; echo ready; while true; do sleep 1; done"],
        )  # fmt: skip
        running(spot["id"])
        container = wait_until(lambda: (found := containers_of(engine, spot["id"])) and found[0], timeout=60,
                               what="the spot job's container")  # fmt: skip
        wait_until(lambda: b"ready" in container.logs(), timeout=60, what="the spot job's trap set")
        # Let the agent's heartbeats since the start (1 s apart here) say which GPUs stay open:
        # the on-demand job must find the spot job's GPUs in the steady state, not only in the
        # moment before the first of them. (Waiting longer only makes the check stricter.)
        time.sleep(3)
        needy = shopper.submit(image=image, command=["sh", "-c", "echo took the room"], gpu_count=2)
        needy = shopper.wait_final(needy["id"], timeout=120)
        assert needy["state"] == "succeeded", logs()
        [preempted] = Allocation.objects.filter(job_id=spot["id"], release_reason="preempted")
        # Killed once the grace ran out, and reported as preempted.
        assert f"allocation={preempted.pk} exit_code=137 reason=preempted" in stack.log("agent"), logs()
        notice = wait_until(lambda: "notice" in (text := log_text(spot["id"])) and text, timeout=30, what="notice")
        assert "ready" in notice
        assert shopper.http.post(f"/api/v1/jobs/{spot['id']}/cancel").status_code == 200  # queued again: done
    except AssertionError as error:
        raise AssertionError(f"{error!r}\n{logs()}") from error

    print(json.dumps({"container_e2e": timings}))
    if os.environ.get("CONTAINER_E2E_REPORT"):
        with open(os.environ["CONTAINER_E2E_REPORT"], "w") as report:
            json.dump(timings, report)


def test_a_jobs_data_is_staged_by_the_agent_and_the_container_has_no_network(tmp_path):
    """Inputs from a real S3-compatible server (moto, on loopback) into the job's scratch, the job
    (no network: its own try to reach the store fails) transforms them, its output lands in the
    bucket with the recorded checksum, and the residency record lists both; a bad checksum fails
    the next job before it runs."""
    import hashlib

    from marketplace.devtools.s3 import REGION, s3_server

    engine = real.client()
    image = real.image()
    with s3_server(tmp_path / "s3.log") as s3:
        store = s3.client()
        store.create_bucket(Bucket="renter-data", CreateBucketConfiguration={"LocationConstraint": REGION})
        numbers = b"1\n2\n3\n4\n"
        store.put_object(Bucket="renter-data", Key="in/numbers.txt", Body=numbers)
        registry = os.environ.get("SHEDSHARE_TEST_REGISTRY", "127.0.0.1:5000")
        stack = stack_start(tmp_path, port=free_port(), JOB_IMAGE_PRIVATE_REGISTRIES=registry,
                            JOB_DATA_PRIVATE_HOSTS=s3.host)  # fmt: skip
        stack.registry = registry
        try:
            owner, renter = user_make("dora-owner"), user_make("dieter-renter")
            unit, token = unit_register(owner=owner, name="Data shed", country="DE")
            wallet_credit_promotional(user=renter, amount_micros=50_000_000, key="e2e-data")
            shopper = Renter(stack.base_url, api_key_create(user=renter, name="e2e")[1])
            config = str(tmp_path / "agent" / "agent.json")
            enrolled = stack.run(devstack.agent_argv("enrol", "--url", stack.base_url, "--token", token, "--config",
                                                     config, "--country", "DE"))  # fmt: skip
            assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
            stack.start(
                "agent",
                devstack.agent_argv("run", "--config", config, "--simulate", "1xH100-80GB", "--runtime", "docker",
                                    "--state-dir", str(tmp_path / "agent" / "state"), "--usage-interval", "1"),
                SHEDSHARE_AGENT_REGISTRIES=registry, SHEDSHARE_AGENT_REGISTRY_MIRRORS=registry,
                SHEDSHARE_AGENT_MEMORY_MB_PER_GPU="256", SHEDSHARE_AGENT_DATA_PRIVATE_HOSTS=s3.host,
            )  # fmt: skip

            def logs() -> str:
                return "\n".join(f"===== {name}\n{stack.log(name)[-5000:]}" for name in ("web", "worker", "agent"))

            wait_until(lambda: Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE, timeout=60,
                       what=lambda: f"the unit online\n{logs()}")  # fmt: skip
            script = (
                "awk '{s+=$1} END {print s}' /scratch/inputs/numbers.txt > /scratch/outputs/sum.txt; "
                f"if wget -q -T 3 -O /dev/null http://{s3.host}/; then echo NETWORK-REACHED; else echo no-network; fi"
            )
            data_job = {
                "image": image, "command": ["sh", "-c", script], "gpu_count": 1, "jurisdictions": ["DE"],
                "inputs": [{"url": s3.presign("GET", "renter-data", "in/numbers.txt"), "path": "numbers.txt",
                            "jurisdiction": "DE", "sha256": hashlib.sha256(numbers).hexdigest(), "size": len(numbers)}],
                "outputs": [{"url": s3.presign("PUT", "renter-data", "out/sum.txt"), "path": "sum.txt",
                             "jurisdiction": "DE-HE"}],
            }  # fmt: skip
            job = shopper.wait_final(shopper.submit(**data_job)["id"], timeout=180)
            assert job["state"] == "succeeded", (job, logs())
            output = store.get_object(Bucket="renter-data", Key="out/sum.txt")["Body"].read()
            assert output.strip() == b"10"
            text = wait_until(lambda: "network" in (t := shopper.http.get(f"/api/v1/jobs/{job['id']}/logs",
                              headers={"Accept": "text/plain"}).text) and t, timeout=30, what="the log")  # fmt: skip
            assert "no-network" in text and "NETWORK-REACHED" not in text
            record = shopper.http.get(f"/api/v1/jobs/{job['id']}/residency").json()
            assert [p["runs_in"] for p in record["placements"]] == ["container"]
            assert record["isolation"]["network"] == "none: the container had no network"
            data = record["data"]
            [staged_in] = data["inputs"]["staged"]
            [staged_out] = data["outputs"]["staged"]
            assert staged_in["ok"] and staged_in["files"][0]["sha256"] == hashlib.sha256(numbers).hexdigest()
            assert staged_out["ok"] and staged_out["files"][0]["sha256"] == hashlib.sha256(output).hexdigest()
            assert staged_out["files"][0]["jurisdiction"] == "DE-HE"
            assert "X-Amz-Signature" not in json.dumps(data)

            bad = {**data_job, "inputs": [{**data_job["inputs"][0], "sha256": "0" * 64}]}
            failed = shopper.wait_final(shopper.submit(**bad)["id"], timeout=120)
            assert failed["state"] == "failed" and "checksum" in failed["failure_reason"], failed
            assert failed["started_at"] is None
            assert containers_of(engine, failed["id"]) == []
        finally:
            stack.stop_all()


def test_a_service_in_a_real_container_is_reached_through_the_relay(stack, tmp_path):
    """A busybox container serving HTTP (a 100 MiB file among others) and a TCP echo, reached
    through the marketplace over the agent's stream: with the renter's key only, every byte
    intact, the echo through `shedshare forward`'s tunnel, and nothing served once cancelled."""
    import asyncio
    import hashlib
    import socket
    import threading

    import httpx

    from marketplace.cli.forward import serve

    size = 100 * 2**20
    owner, renter, stranger = user_make("sora-owner"), user_make("rei-renter"), user_make("sven-stranger")
    unit, token = unit_register(owner=owner, name="Service shed", country="DE")
    wallet_credit_promotional(user=renter, amount_micros=50_000_000, key="e2e-service")
    key = api_key_create(user=renter, name="e2e")[1]
    shopper = Renter(stack.base_url, key)
    config = str(tmp_path / "agent" / "agent.json")
    enrolled = stack.run(devstack.agent_argv("enrol", "--url", stack.base_url, "--token", token, "--config", config,
                                             "--country", "DE"))  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
    start_agent(stack, config, tmp_path)

    def logs() -> str:
        return "\n".join(f"===== {name}\n{stack.log(name)[-5000:]}" for name in ("web", "worker", "agent"))

    script = (f"mkdir -p $HOME/www && echo hello from a container > $HOME/www/index.html && "
              f"yes 0123456789abcdef | head -c {size} > $HOME/www/big && "
              "(nc -ll -p 7007 -e cat &) && exec httpd -f -p 8080 -h $HOME/www")  # fmt: skip
    job = shopper.submit(image=real.image(), command=["sh", "-c", script], workload_class="service",
                         ports=[{"port": 8080}, {"port": 7007, "protocol": "tcp"}])  # fmt: skip
    base = f"{stack.base_url}/services/{job['id']}/8080"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        wait_until(lambda: Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE, timeout=60,
                   what=lambda: f"the unit online\n{logs()}")  # fmt: skip
        hello = wait_until(
            lambda: (r := httpx.get(f"{base}/index.html", headers=auth, timeout=30)).status_code == 200 and r,
            timeout=180, what=lambda: f"the service answering: {shopper.job(job['id'])['state']}\n{logs()}",
        )  # fmt: skip
        assert hello.text == "hello from a container\n"
        assert httpx.get(f"{base}/index.html", timeout=30).status_code == 401
        theirs = {"Authorization": f"Bearer {api_key_create(user=stranger, name='e2e')[1]}"}
        assert httpx.get(f"{base}/index.html", headers=theirs, timeout=30).status_code == 404

        expected = hashlib.sha256()
        line = b"0123456789abcdef\n"
        whole, rest = divmod(size, len(line))
        expected.update(line * whole + line[:rest])
        digest, got = hashlib.sha256(), 0
        with httpx.stream("GET", f"{base}/big", headers=auth, timeout=120) as big:
            assert big.status_code == 200
            for chunk in big.iter_bytes():
                digest.update(chunk)
                got += len(chunk)
        assert got == size and digest.hexdigest() == expected.hexdigest()

        bound, ready = [], threading.Event()

        def forward() -> None:
            asyncio.run(serve(stack.base_url, key, job["id"], 7007, 0,
                              ready=lambda port: (bound.append(port), ready.set()), refused=print))  # fmt: skip

        threading.Thread(target=forward, daemon=True).start()
        assert ready.wait(15)
        with socket.create_connection(("127.0.0.1", bound[0]), timeout=30) as conn:
            conn.sendall(b"echo through the shed\n")
            assert conn.recv(100) == b"echo through the shed\n"

        assert shopper.http.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200
        assert httpx.get(f"{base}/index.html", headers=auth, timeout=30).status_code == 410
        assert shopper.wait_final(job["id"], timeout=60)["state"] == "cancelled"
    except AssertionError as error:
        raise AssertionError(f"{error}\n{logs()}") from None
