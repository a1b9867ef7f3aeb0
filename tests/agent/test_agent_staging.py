"""The job's data moved by the agent: inputs fetched before the start, outputs uploaded after the
exit, against a real HTTP server on loopback that answers what each test tells it to."""

import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from nodes.agent import staging
from nodes.agent.client import AgentClient
from nodes.agent.isolation import IsolationConfig
from nodes.agent.loop import Agent, Options
from nodes.agent.protocol import Finish, Staging
from nodes.agent.runtime import JobSpec
from nodes.agent.runtime.job_user import JobUser
from nodes.agent.runtime.process import ProcessRuntime
from nodes.agent.runtime.spec import container_spec
from nodes.agent.staging import DataPolicy, StagingError, fetch, upload
from tests.agent.fakes import CREDENTIAL, HONOURS_ALL, FakeServer, wait_exit

DATA = b"weights " * 1000
DATA_SHA = hashlib.sha256(DATA).hexdigest()
FAST = Options(usage_interval_s=0.2, max_jobs=1, tick_s=0.02, poll_wait_s=0, error_base_s=0.05)


@dataclass
class Storage:
    """What the storage serves (path -> status and body) and what it was sent."""

    objects: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    put_status: int = 200
    gets: list[str] = field(default_factory=list)
    puts: dict[str, bytes] = field(default_factory=dict)
    put_lengths: dict[str, str | None] = field(default_factory=dict)
    host: str = ""

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://{self.host}{path}?X-Amz-Signature=s3cr3t"


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        path = self.path.split("?")[0]
        self.server.storage.gets.append(path)
        status, body = self.server.storage.objects.get(path, (404, b"no such key"))
        self.send_response(status)
        if status in (301, 302, 307):
            self.send_header("Location", self.server.storage.url("/elsewhere"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        length = self.headers.get("Content-Length")
        self.server.storage.put_lengths[path] = length
        self.server.storage.puts[path] = self.rfile.read(int(length or 0))
        self.send_response(self.server.storage.put_status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    storage: Storage


@pytest.fixture
def storage() -> Iterator[Storage]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.storage = Storage(host=f"127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.storage
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with staging.new_client() as http:
        yield http


def public(host: str) -> list[str]:
    return ["93.184.216.34"]


def get(storage: Storage, tmp_path: Path, client: httpx.Client, item: dict[str, Any], limit: int = 2**30):
    return fetch(item, tmp_path, client=client, limit_bytes=limit, allow={storage.host}, resolve=public)


def reason_of(call) -> StagingError:
    with pytest.raises(StagingError) as failed:
        call()
    return failed.value


def test_a_fetch_writes_the_input_under_inputs_checking_its_size_and_sha256(storage, tmp_path, client):
    storage.objects["/bucket/w.bin"] = (200, DATA)
    item = {"url": storage.url("/bucket/w.bin"), "path": "model/w.bin", "sha256": DATA_SHA, "size": len(DATA)}

    staged = get(storage, tmp_path, client, item)

    assert (tmp_path / "inputs" / "model" / "w.bin").read_bytes() == DATA
    assert staged == staging.Staged("model/w.bin", len(DATA), DATA_SHA)


@pytest.mark.parametrize(
    ("declared", "reason"),
    [
        ({"sha256": "0" * 64}, Staging.CHECKSUM),
        ({"size": len(DATA) - 1}, Staging.SIZE),
        ({"size": len(DATA) + 1}, Staging.SIZE),
    ],
)
def test_an_input_unlike_its_declaration_fails_and_is_not_kept(storage, tmp_path, client, declared, reason):
    storage.objects["/w.bin"] = (200, DATA)
    item = {"url": storage.url("/w.bin"), "path": "w.bin"} | declared

    failure = reason_of(lambda: get(storage, tmp_path, client, item))

    assert failure.reason == reason
    assert not (tmp_path / "inputs" / "w.bin").exists()


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (404, Staging.MISSING),
        (403, Staging.EXPIRED),
        (401, Staging.EXPIRED),
        (500, Staging.UNREACHABLE),
        (302, Staging.UNREACHABLE),
    ],
)
def test_the_storage_answer_says_why_a_fetch_failed_without_quoting_the_signature(
    storage, tmp_path, client, status, reason
):
    storage.objects["/w.bin"] = (status, b"nope")

    failure = reason_of(lambda: get(storage, tmp_path, client, {"url": storage.url("/w.bin"), "path": "w.bin"}))

    assert failure.reason == reason
    assert failure.detail.startswith("w.bin: ")
    assert "s3cr3t" not in failure.detail
    assert storage.gets == ["/w.bin"]  # a redirect is not followed
    assert not (tmp_path / "inputs" / "w.bin").exists()


def test_a_storage_that_refuses_connections_is_unreachable(tmp_path, client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{probe.getsockname()[1]}"
    item = {"url": f"http://{host}/w.bin", "path": "w.bin"}

    failure = reason_of(lambda: fetch(item, tmp_path, client=client, limit_bytes=2**20, allow={host}))

    assert failure.reason == Staging.UNREACHABLE


def test_an_input_over_the_scratch_left_is_stopped_and_its_partial_file_removed(storage, tmp_path, client):
    storage.objects["/w.bin"] = (200, DATA)

    failure = reason_of(lambda: get(storage, tmp_path, client, {"url": storage.url("/w.bin"), "path": "w.bin"}, 100))

    assert failure.reason == Staging.SCRATCH_FULL
    assert list((tmp_path / "inputs").iterdir()) == []


def test_the_scratch_cap_holds_for_all_inputs_together(storage, tmp_path):
    storage.objects["/a"] = storage.objects["/b"] = (200, b"x" * 600 * 1024)
    items = [{"url": storage.url(p), "path": p[1:]} for p in ("/a", "/b")]
    policy = DataPolicy(scratch_max_mb=1, data_private_hosts=(storage.host,))

    report = staging.stage_in(items, tmp_path, policy)

    assert (report["ok"], report["reason"]) == (False, Staging.SCRATCH_FULL)
    assert [f["path"] for f in report["files"]] == ["a"]
    assert not (tmp_path / "inputs" / "b").exists()


@pytest.mark.parametrize(
    ("url", "addresses"),
    [
        ("https://127.0.0.1/w.bin", []),
        ("https://[::1]/w.bin", []),
        ("https://169.254.169.254/latest", []),
        ("https://metadata.internal/w.bin", []),
        ("https://storage.example/w.bin", ["10.0.0.5"]),
        ("https://storage.example/w.bin", ["93.184.216.34", "192.168.1.2"]),
        ("http://storage.example/w.bin", ["93.184.216.34"]),  # plain http, even to a public address
    ],
)
def test_an_internal_or_plain_http_endpoint_is_refused_before_any_connection(tmp_path, client, url, addresses):
    item = {"url": url, "path": "w.bin"}

    failure = reason_of(lambda: fetch(item, tmp_path, client=client, limit_bytes=2**20, resolve=lambda host: addresses))

    assert failure.reason == Staging.REFUSED


def test_loopback_over_http_is_fetched_only_from_a_host_the_owner_lists(storage, tmp_path, client):
    storage.objects["/w.bin"] = (200, DATA)
    item = {"url": storage.url("/w.bin"), "path": "w.bin"}

    refused = reason_of(lambda: fetch(item, tmp_path, client=client, limit_bytes=2**20, allow={"127.0.0.1:1"}))
    staged = fetch(item, tmp_path, client=client, limit_bytes=2**20, allow={storage.host})

    assert refused.reason == Staging.REFUSED
    assert storage.gets == ["/w.bin"]  # once: the refusal connected nowhere
    assert staged.sha256 == DATA_SHA


@pytest.mark.parametrize("path", ["../escape", "a/../../b", "/etc/passwd", "a//b", "./a", ""])
def test_a_path_outside_its_folder_is_refused_both_ways(storage, tmp_path, client, path):
    item = {"url": storage.url("/w.bin"), "path": path}

    fetched = reason_of(lambda: get(storage, tmp_path, client, item))
    uploaded = reason_of(lambda: upload(item, tmp_path, client=client, allow={storage.host}))

    assert fetched.reason == uploaded.reason == Staging.BAD_PATH
    assert storage.gets == [] and storage.puts == {}


def write_output(tmp_path: Path, path: str, data: bytes = DATA) -> Path:
    target = tmp_path / "outputs" / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def test_an_upload_puts_exactly_the_file_with_its_length_and_reports_its_sha256(storage, tmp_path, client):
    write_output(tmp_path, "run/result.bin")

    staged = upload(
        {"url": storage.url("/out/result.bin"), "path": "run/result.bin"}, tmp_path, client=client, allow={storage.host}
    )

    assert storage.puts["/out/result.bin"] == DATA
    assert storage.put_lengths["/out/result.bin"] == str(len(DATA))
    assert staged == staging.Staged("run/result.bin", len(DATA), DATA_SHA)


def test_an_output_the_job_did_not_write_is_missing(storage, tmp_path, client):
    (tmp_path / "outputs").mkdir()
    item = {"url": storage.url("/out/r.bin"), "path": "run/r.bin"}

    failure = reason_of(lambda: upload(item, tmp_path, client=client, allow={storage.host}))

    assert failure.reason == Staging.MISSING
    assert storage.puts == {}


def test_an_output_reached_through_a_link_is_never_read(storage, tmp_path, client):
    secret = tmp_path / "agent-secret"
    secret.write_bytes(b"credential")
    outputs = tmp_path / "outputs"
    (outputs / "real").mkdir(parents=True)
    (outputs / "real" / "r.bin").write_bytes(b"fine")
    (outputs / "link.bin").symlink_to(secret)
    (outputs / "linked-dir").symlink_to(outputs / "real")
    os.mkfifo(outputs / "pipe")

    for path in ("link.bin", "linked-dir/r.bin", "pipe", "real"):
        item = {"url": storage.url(f"/out/{path}"), "path": path}
        failure = reason_of(lambda item=item: upload(item, tmp_path, client=client, allow={storage.host}))
        assert failure.reason == Staging.BAD_PATH, path
    assert storage.puts == {}


def test_outputs_as_a_link_are_never_read(storage, tmp_path, client):
    elsewhere = tmp_path / "elsewhere"
    write_output(elsewhere, "r.bin")
    (tmp_path / "outputs").symlink_to(elsewhere / "outputs")

    failure = reason_of(
        lambda: upload({"url": storage.url("/r"), "path": "r.bin"}, tmp_path, client=client, allow={storage.host})
    )

    assert failure.reason == Staging.BAD_PATH


def test_a_refused_upload_says_why(storage, tmp_path, client):
    write_output(tmp_path, "r.bin")
    storage.put_status = 403

    failure = reason_of(
        lambda: upload({"url": storage.url("/r"), "path": "r.bin"}, tmp_path, client=client, allow={storage.host})
    )

    assert failure.reason == Staging.EXPIRED


def test_the_docker_runtime_mounts_the_staged_folders_over_its_scratch(tmp_path):
    job = JobSpec(allocation_id="a-1", job_id="j-1", image="python:3.12", command=("true",), gpu_uuids=("GPU-a",))
    kwargs = container_spec(job, IsolationConfig(), scratch=tmp_path)

    assert kwargs["volumes"] == {
        str(tmp_path / "inputs"): {"bind": "/scratch/inputs", "mode": "rw"},
        str(tmp_path / "outputs"): {"bind": "/scratch/outputs", "mode": "rw"},
    }
    assert "volumes" not in container_spec(job, IsolationConfig())


# The loop, with the process runtime: the job's HOME is its scratch.

COPY = 'cat "$HOME/inputs/data/in.txt" > "$HOME/outputs/run/out.txt"; exit ${CODE:-0}'


def make_agent(server: FakeServer, storage: Storage, tmp_path: Path) -> Agent:
    api = AgentClient("http://shed.test", CREDENTIAL, transport=server.transport())
    runtime = ProcessRuntime(tmp_path / "work", tmp_path / "logs", kill_grace_s=1.0)
    deadline = time.monotonic() + 60  # a guard against a hung loop, far above any test's need

    def sleep(seconds: float) -> None:
        assert time.monotonic() < deadline, "the agent loop did not finish in time"
        time.sleep(seconds)

    data = DataPolicy(data_private_hosts=(storage.host,))
    return Agent(api, runtime, server.inventory, FAST, sleep=sleep, policy=HONOURS_ALL, data=data)


def assign(server: FakeServer, storage: Storage, command: str, code: int = 0) -> str:
    storage.objects["/in.txt"] = (200, b"hello from the renter\n")
    inputs = [{"url": storage.url("/in.txt"), "path": "data/in.txt", "jurisdiction": "DE", "size": 22}]
    outputs = [{"url": storage.url("/results/out.txt"), "path": "run/out.txt", "jurisdiction": "DE"}]
    env = {"CODE": str(code)}
    return server.assign(["sh", "-c", command], env=env, inputs=inputs, outputs=outputs)


def test_the_job_finds_its_inputs_in_home_and_what_it_writes_to_outputs_is_uploaded(server, storage, tmp_path):
    allocation = assign(server, storage, 'mkdir -p "$HOME/outputs/run"; ' + COPY)
    fetched_at_start = []
    start = server._start

    def recording_start(allocation_id: str, body: dict[str, Any]):
        fetched_at_start.append(list(storage.gets))
        return start(allocation_id, body)

    server._start = recording_start

    assert make_agent(server, storage, tmp_path).run() == 0

    assert fetched_at_start == [["/in.txt"]]  # fetched before the start: none of the renter's time
    assert storage.puts["/results/out.txt"] == b"hello from the renter\n"
    staged_in, staged_out = server.staging[allocation]
    sha = hashlib.sha256(b"hello from the renter\n").hexdigest()
    assert staged_in | {"seconds": 0} == {
        "phase": "in",
        "ok": True,
        "reason": "",
        "detail": "",
        "files": [{"path": "data/in.txt", "size": 22, "sha256": sha}],
        "seconds": 0,
    }
    assert staged_out["phase"] == "out" and staged_out["ok"]
    assert staged_out["files"] == [{"path": "run/out.txt", "size": 22, "sha256": sha}]
    assert server.finished[allocation] == {"exit_code": 0, "reason": Finish.EXITED}
    assert not (tmp_path / "work" / allocation).exists()  # cleaned up after the upload


def test_a_job_whose_inputs_cannot_be_fetched_never_starts(server, storage, tmp_path):
    allocation = assign(server, storage, COPY)
    storage.objects["/in.txt"] = (404, b"")

    assert make_agent(server, storage, tmp_path).run() == 0

    assert server.started == []
    assert server.finished[allocation] == {"exit_code": None, "reason": Finish.STAGE_IN_FAILED}
    [report] = server.staging[allocation]
    assert (report["phase"], report["ok"], report["reason"]) == ("in", False, Staging.MISSING)
    assert report["detail"].startswith("data/in.txt: ") and "s3cr3t" not in report["detail"]
    assert not (tmp_path / "work" / allocation).exists()


def test_a_failed_upload_fails_the_job_with_its_real_exit_code(server, storage, tmp_path):
    allocation = assign(server, storage, 'mkdir -p "$HOME/outputs/run"; ' + COPY, code=3)
    storage.put_status = 500

    assert make_agent(server, storage, tmp_path).run() == 0

    assert server.finished[allocation] == {"exit_code": 3, "reason": Finish.STAGE_OUT_FAILED}
    staged_out = server.staging[allocation][-1]
    assert (staged_out["phase"], staged_out["ok"], staged_out["reason"]) == ("out", False, Staging.UNREACHABLE)


def test_an_output_the_job_did_not_write_fails_the_job(server, storage, tmp_path):
    allocation = assign(server, storage, "true")

    assert make_agent(server, storage, tmp_path).run() == 0

    assert server.finished[allocation] == {"exit_code": 0, "reason": Finish.STAGE_OUT_FAILED}
    assert server.staging[allocation][-1]["reason"] == Staging.MISSING


def test_a_cancelled_job_uploads_nothing(server, storage, tmp_path):
    allocation = assign(
        server, storage, 'mkdir -p "$HOME/outputs/run"; echo partial > "$HOME/outputs/run/out.txt"; sleep 30'
    )
    server.cancel_once_started = True

    assert make_agent(server, storage, tmp_path).run() == 0

    assert server.finished[allocation]["reason"] == Finish.CANCELLED
    assert [report["phase"] for report in server.staging[allocation]] == ["in"]
    assert storage.puts == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs the agent to run as root")
def test_a_root_agent_hands_the_staged_inputs_to_the_job_user_who_writes_its_outputs(storage, tmp_path):
    jobs = Path(tempfile.mkdtemp(prefix="shedshare-test-"))
    os.chmod(jobs, 0o755)  # noqa: S103 - reachable by the job user, as /var/lib is
    runtime = ProcessRuntime(jobs / "work", jobs / "logs", job_user=JobUser(65534, 65534))
    job = JobSpec(allocation_id="a-1", job_id="j-1", image="-", command=("sh", "-c", COPY), gpu_uuids=("GPU-a",))
    try:
        scratch = runtime.make_scratch(job)
        storage.objects["/in.txt"] = (200, b"data\n")
        (scratch / "outputs" / "run").mkdir()
        with staging.new_client() as http:
            fetch({"url": storage.url("/in.txt"), "path": "data/in.txt"}, scratch, client=http, limit_bytes=2**20,
                  allow={storage.host})  # fmt: skip

        handle = runtime.start(job)
        code = wait_exit(runtime, handle)

        assert code == 0, handle.log_path.read_text()
        written = scratch / "outputs" / "run" / "out.txt"
        assert (written.read_bytes(), written.stat().st_uid) == (b"data\n", 65534)
        assert (scratch / "inputs" / "data" / "in.txt").stat().st_uid == 65534
        runtime.cleanup(handle)
        assert not scratch.exists()
    finally:
        shutil.rmtree(jobs)


def _authority_and_certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A certificate authority of the test's own and a certificate it signs for 127.0.0.1: the
    CA's PEM, the server's certificate chain and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "owner's storage CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    paths = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(server.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_storage(tmp_path) -> Iterator[tuple[Storage, Path]]:
    """The storage over HTTPS, under a certificate authority of the test's own (its PEM)."""
    import ssl

    ca, certificate, key = _authority_and_certificate(tmp_path)
    httpd = _Server(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.storage = Storage(host=f"127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.storage, ca
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_data_moves_to_and_from_storage_under_the_owners_own_ca(tls_storage, tmp_path):
    storage, ca = tls_storage
    storage.objects["/data.bin"] = (200, DATA)
    policy = DataPolicy(data_private_hosts=(storage.host,), data_ca_file=str(ca), resolve=public)
    item = {"path": "data.bin", "url": storage.url("/data.bin", "https"), "sha256": DATA_SHA}
    output = {"path": "result.bin", "url": storage.url("/out/result.bin", "https")}
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "result.bin").write_bytes(b"done")

    fetched = staging.stage_in([item], tmp_path, policy)
    uploaded = staging.stage_out([output], tmp_path, policy)

    assert fetched["ok"] and fetched["files"] == [{"path": "data.bin", "size": len(DATA), "sha256": DATA_SHA}]
    assert (tmp_path / "inputs" / "data.bin").read_bytes() == DATA
    assert uploaded["ok"] and storage.puts == {"/out/result.bin": b"done"}


def test_an_https_storage_whose_certificate_is_not_trusted_is_refused_and_says_so(tls_storage, tmp_path, client):
    storage, _ = tls_storage
    storage.objects["/data.bin"] = (200, DATA)
    item = {"path": "data.bin", "url": storage.url("/data.bin", "https")}

    failure = reason_of(lambda: get(storage, tmp_path, client, item))

    assert failure.reason == Staging.UNREACHABLE
    assert "TLS certificate is not one this unit trusts" in failure.detail and "s3cr3t" not in failure.detail
    assert storage.gets == [] and not (tmp_path / "inputs" / "data.bin").exists()


def test_a_ca_file_that_is_not_one_is_a_config_error(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate")

    with pytest.raises(ValueError, match="not a PEM file of certificates"):
        staging.PARSERS["data_ca_file"](str(tmp_path / "ca.pem"))
