"""Services on sheds, end to end through real processes: a job serving HTTP and TCP is reached
through the marketplace's relay over its agent's stream (the web server, the Celery worker and
the agent as in test_e2e.py; the agent's development runtime, whose jobs listen on the host's
loopback)."""

import asyncio
import hashlib
import socket
import threading
import time

import httpx
import pytest

from marketplace.accounts.services import api_key_create
from marketplace.cli.forward import serve
from marketplace.jobs.models import ServiceTraffic
from tests.conftest import run_async, user_make
from tests.e2e import free_port, wait_until
from tests.system.test_e2e import agent_start, dump_logs

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

BIG = 100 * 2**20

# The job: HTTP on one port (/hello; /big?n=BYTES, a deterministic body sent in chunks; /stream,
# three server-sent events), a TCP echo on the other.
SERVER = r"""
import http.server, socket, sys, threading, time
http_port, echo_port = int(sys.argv[1]), int(sys.argv[2])
def block(i):
    return bytes([(i * 7 + j) % 251 for j in range(256)]) * 256
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.path.startswith("/big"):
            n = int(self.path.split("=")[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            i = 0
            while n > 0:
                chunk = block(i % 16)[:n]
                self.wfile.write(chunk)
                n -= len(chunk)
                i += 1
        elif self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                data = f"data: token {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
        else:
            body = f"hello {self.path} auth={self.headers.get('Authorization')}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[::-1])
def echo():
    listener = socket.create_server(("127.0.0.1", echo_port))
    while True:
        conn, _ = listener.accept()
        def serve(conn):
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
threading.Thread(target=echo, daemon=True).start()
http.server.ThreadingHTTPServer(("127.0.0.1", http_port), Handler).serve_forever()
"""


def expected_big(n: int) -> str:
    digest, i = hashlib.sha256(), 0
    while n > 0:
        chunk = (bytes([((i % 16) * 7 + j) % 251 for j in range(256)]) * 256)[:n]
        digest.update(chunk)
        n -= len(chunk)
        i += 1
    return digest.hexdigest()


def forward_in_thread(base_url: str, key: str, job_id: str, port: int) -> tuple[int, list[str]]:
    bound, refusals, ready = [], [], threading.Event()

    def run() -> None:
        def on_ready(port: int) -> None:
            bound.append(port)
            ready.set()

        asyncio.run(serve(base_url, key, job_id, port, 0, ready=on_ready, refused=refusals.append))

    threading.Thread(target=run, daemon=True).start()
    assert ready.wait(15), "the forward did not listen"
    return bound[0], refusals


def test_a_service_job_is_reached_through_the_relay(running_stack, tmp_path):
    stack = running_stack
    _owner, _renter, _unit, shopper = agent_start(stack, tmp_path, connection="stream")
    key = shopper.http.headers["Authorization"].removeprefix("Bearer ")
    _, stranger_key = api_key_create(user=user_make("sam-stranger"), name="e2e")
    http_port, echo_port = free_port(), free_port()
    job = shopper.submit(
        image="docker.io/library/python:3.12-slim",
        command=["python3", "-c", SERVER, str(http_port), str(echo_port)],
        workload_class="service",
        ports=[{"port": http_port, "protocol": "http"}, {"port": echo_port, "protocol": "tcp"}],
    )
    assert job["max_duration_s"] == 30 * 24 * 3600  # a service runs until stopped, within the cap
    base = f"{stack.base_url}/services/{job['id']}/{http_port}"
    web = httpx.Client(timeout=60)
    try:
        wait_until(
            lambda: shopper.job(job["id"])["state"] == "running",
            timeout=60,
            what=lambda: f"the job running: {shopper.job(job['id'])}",
        )
        hello = wait_until(
            lambda: (
                (r := web.get(f"{base}/hello?x=1", headers={"Authorization": f"Bearer {key}"})).status_code == 200 and r
            ),
            timeout=30,
            what="the service answering",
        )
        # The renter's key reaches the service, and is not passed on to it.
        assert hello.text == "hello /hello?x=1 auth=None"
        # X-Shedshare-Key leaves Authorization to the service's own clients.
        own = web.get(f"{base}/mine", headers={"X-Shedshare-Key": key, "Authorization": "Bearer service-token"})
        assert own.text == "hello /mine auth=Bearer service-token"
        assert web.post(f"{base}/echo", content=b"abc", headers={"X-Shedshare-Key": key}).content == b"cba"

        made = shopper.http.post(f"/api/v1/jobs/{job['id']}/endpoint-tokens", json={"name": "my users"}).json()
        with_token = web.get(f"{base}/hello", headers={"Authorization": f"Bearer {made['token']}"})
        assert with_token.status_code == 200 and with_token.text == "hello /hello auth=None"
        assert shopper.http.delete(f"/api/v1/jobs/{job['id']}/endpoint-tokens/{made['id']}").status_code == 204
        assert web.get(f"{base}/hello", headers={"Authorization": f"Bearer {made['token']}"}).status_code == 401
        assert web.get(f"{base}/hello").status_code == 401
        stranger = web.get(f"{base}/hello", headers={"Authorization": f"Bearer {stranger_key}"})
        assert stranger.status_code == 404 and stranger.headers["content-type"] == "application/problem+json"
        undeclared = f"{stack.base_url}/services/{job['id']}/{free_port()}/hello"
        assert web.get(undeclared, headers={"Authorization": f"Bearer {key}"}).status_code == 404
        tcp_as_http = f"{stack.base_url}/services/{job['id']}/{echo_port}/"
        assert web.get(tcp_as_http, headers={"Authorization": f"Bearer {key}"}).status_code == 404

        with web.stream("GET", f"{base}/stream", headers={"Authorization": f"Bearer {key}"}) as events:
            assert events.headers["content-type"] == "text/event-stream"
            assert [line for line in events.iter_lines() if line] == [f"data: token {i}" for i in range(3)]

        digest, size = hashlib.sha256(), 0
        with web.stream("GET", f"{base}/big?n={BIG}", headers={"Authorization": f"Bearer {key}"}) as big:
            assert big.status_code == 200
            for chunk in big.iter_bytes():
                digest.update(chunk)
                size += len(chunk)
        assert size == BIG and digest.hexdigest() == expected_big(BIG)

        local, refusals = forward_in_thread(stack.base_url, key, job["id"], echo_port)
        with socket.create_connection(("127.0.0.1", local), timeout=30) as conn:
            payload = bytes(range(256)) * 4096  # 1 MiB through the tunnel and back
            conn.sendall(payload)
            received = b""
            while len(received) < len(payload):
                received += conn.recv(65536)
            assert received == payload
        denied, denied_refusals = forward_in_thread(stack.base_url, stranger_key, job["id"], echo_port)
        with socket.create_connection(("127.0.0.1", denied), timeout=30) as conn:
            assert conn.recv(10) == b""
        wait_until(lambda: denied_refusals, timeout=15, what="the stranger's forward refused")
        assert denied_refusals[0].startswith("404")
        assert refusals == []

        assert shopper.http.post(f"/api/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
        after = web.get(f"{base}/hello", headers={"Authorization": f"Bearer {key}"})
        assert after.status_code == 410, after.text
        shopper.wait_final(job["id"])

        traffic = wait_until(
            lambda: list(ServiceTraffic.objects.filter(job_id=job["id"], port=http_port)),
            timeout=20,
            what="the traffic stored",
        )
        assert traffic[0].requests >= 6 and traffic[0].bytes_out > BIG
        record = shopper.http.get(f"/api/v1/jobs/{job['id']}/residency").json()
        [served] = [row for row in record["services"]["traffic"] if row["port"] == http_port]
        assert served["bytes_out"] > BIG
        services = shopper.job(job["id"])["services"]
        assert services[0]["url"] == f"{base}/" and services[0]["requests_today"] >= 6
        assert services[1]["forward"] == f"shedshare forward {job['id']} {echo_port}"
    except AssertionError as error:
        raise AssertionError(f"{error}\n{dump_logs(stack)}") from None


ABUSED = r"""
import http.server, sys, time
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
    def do_GET(self):
        if self.path.startswith("/path/"):
            body = self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/slow":
            time.sleep(1.5)
        if self.path == "/forever":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            data = b"x" * 65536
            while True:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_the_relay_bounds_what_a_client_or_a_job_can_take(tmp_path):
    """A thousand concurrent requests, a response that never ends, a request body that stalls, a body
    over the cap, a job not running yet: each answered within its bound, and the shed's stream
    and heartbeats go on."""
    import resource

    from marketplace.jobs.models import Job
    from nodes.models import Unit
    from tests.e2e import stack_start

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))  # a thousand clients here, as many there
    stack = stack_start(tmp_path, port=free_port(), RELAY_CHANNELS_PER_JOB="8", RELAY_IDLE_TIMEOUT_S="3",
                        RELAY_SERVICE_DOMAIN="svc.test",
                        RELAY_RESPONSE_MAX_BYTES=str(4 * 2**20), RELAY_REQUEST_MAX_BYTES=str(2**20))  # fmt: skip
    try:
        _owner, _renter, unit, shopper = agent_start(stack, tmp_path, connection="stream")
        key = shopper.http.headers["Authorization"].removeprefix("Bearer ")
        port = free_port()
        job = shopper.submit(image="docker.io/library/python:3.12-slim", command=["python3", "-c", ABUSED, str(port)],
                             workload_class="service", ports=[{"port": port}])  # fmt: skip
        waiting = shopper.submit(image="docker.io/library/python:3.12-slim", command=["true"], gpu_count=8,
                                 ports=[{"port": port}])  # fmt: skip
        auth = {"Authorization": f"Bearer {key}"}
        base = f"{stack.base_url}/services/{job['id']}/{port}"
        wait_until(lambda: httpx.get(f"{base}/", headers=auth, timeout=10).status_code == 200, timeout=60,
                   what=lambda: f"the service answering: {shopper.job(job['id'])['state']}")  # fmt: skip

        # At a host of its own too, its paths at the root.
        by_host = httpx.get(f"{stack.base_url}/", headers={**auth, "Host": f"{job['id']}-{port}.svc.test"}, timeout=10)
        assert by_host.status_code == 200 and by_host.text == "ok", by_host.text
        unknown = httpx.get(f"{stack.base_url}/", headers={**auth, "Host": "nonsense.svc.test"}, timeout=10)
        assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
        assert shopper.job(job["id"])["services"][0]["url"] == f"http://{job['id']}-{port}.svc.test/"

        queued = httpx.get(f"{stack.base_url}/services/{waiting['id']}/{port}/", headers=auth, timeout=10)
        assert queued.status_code == 503 and queued.headers["retry-after"] == "5", queued.text

        async def crowd() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1000)) as client:
                return await asyncio.gather(*(client.get(f"{base}/slow", headers=auth) for _ in range(1000)))

        started = time.monotonic()
        answers = run_async(crowd())
        assert time.monotonic() - started < 120  # every one answered: none waits out a timeout
        statuses = [answer.status_code for answer in answers]
        # Served, or refused at once: past the job's channels (429) or the lookups the relay
        # queues (503), each with Retry-After.
        assert set(statuses) <= {200, 429, 503} and statuses.count(200) >= 8, statuses
        refused = [answer for answer in answers if answer.status_code != 200]
        assert len(refused) >= 500 and all("retry-after" in answer.headers for answer in refused)
        assert all(answer.headers["content-type"] == "application/problem+json" for answer in refused)

        got, started = 0, time.monotonic()
        with (
            pytest.raises(httpx.HTTPError),
            httpx.stream("GET", f"{base}/forever", headers=auth, timeout=30) as endless,
        ):
            for chunk in endless.iter_raw():
                got += len(chunk)
        assert 4 * 2**20 <= got <= 4 * 2**20 + 2**20 and time.monotonic() - started < 30

        with socket.create_connection(("127.0.0.1", int(stack.base_url.rsplit(":", 1)[1])), timeout=30) as loris:
            loris.sendall(f"POST /services/{job['id']}/{port}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                          "Content-Length: 100\r\n\r\nonly a little".encode())  # fmt: skip
            started = time.monotonic()
            answer = loris.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 15, answer

        too_big = httpx.post(f"{base}/", headers=auth, content=b"x" * (2**20 + 1), timeout=30)
        assert too_big.status_code == 413

        # The path reaches the job as the client wrote it: %3F stays in the path, not a query.
        raw = httpx.get(f"{base}/path/caf%C3%A9%3Fx%2Fy?q=1", headers=auth, timeout=10)
        assert raw.status_code == 200 and raw.text == "/path/caf%C3%A9%3Fx%2Fy?q=1"
        head = httpx.head(f"{base}/", headers=auth, timeout=10)
        assert head.status_code == 200 and head.content == b""
        tunnel = httpx.request("CONNECT", f"{base}/", headers=auth, timeout=10)
        assert tunnel.status_code == 405 and tunnel.headers["content-type"] == "application/problem+json"

        # A reader of an endless answer that leaves gives its channel back: all 8 serve again.
        with httpx.stream("GET", f"{base}/forever", headers=auth, timeout=30) as leaving:
            next(leaving.iter_raw())

        async def eight() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as client:
                answers = await asyncio.gather(*(client.get(f"{base}/slow", headers=auth) for _ in range(8)))
                return [answer.status_code for answer in answers]

        wait_until(lambda: run_async(eight()) == [200] * 8, timeout=30, what="the left channel given back")

        assert httpx.get(f"{base}/", headers=auth, timeout=10).status_code == 200  # still serving
        assert Unit.objects.get(pk=unit.pk).status == Unit.Status.ONLINE
        assert "stream_unavailable" not in stack.log("agent") and "stream_closed" not in stack.log("agent")
        assert Job.objects.get(pk=job["id"]).state == Job.State.RUNNING
    except AssertionError as error:
        raise AssertionError(f"{error}\n{dump_logs(stack)}") from None
    finally:
        stack.stop_all()


def test_a_request_reaches_a_stream_held_by_another_connection_server(running_stack, tmp_path):
    """The agent's stream on one connection server, the renter's request on another (the web
    server): the request goes through the server holding the stream."""
    import sys

    from marketplace.devtools import devstack

    stack = running_stack
    port = free_port()
    stack.start("connections", [sys.executable, "-m", "uvicorn", "marketplace.asgi:application", "--host",
                                "127.0.0.1", "--port", str(port), "--ws", "websockets-sansio"])  # fmt: skip
    devstack.wait_http(f"http://127.0.0.1:{port}/api/schema/", timeout=30)
    _owner, _renter, _unit, shopper = agent_start(stack, tmp_path, connection="stream", url=f"http://127.0.0.1:{port}")
    key = shopper.http.headers["Authorization"].removeprefix("Bearer ")
    http_port, echo_port = free_port(), free_port()
    job = shopper.submit(image="docker.io/library/python:3.12-slim",
                         command=["python3", "-c", SERVER, str(http_port), str(echo_port)],
                         ports=[{"port": http_port}, {"port": echo_port, "protocol": "tcp"}])  # fmt: skip
    auth = {"Authorization": f"Bearer {key}"}
    try:
        assert "stream_opened" not in stack.log("web")  # the web server holds no stream
        hello = wait_until(
            lambda: (r := httpx.get(f"{stack.base_url}/services/{job['id']}/{http_port}/peer", headers=auth,
                                    timeout=30)).status_code == 200 and r,
            timeout=60, what=lambda: f"the service through the web server: {shopper.job(job['id'])['state']}",
        )  # fmt: skip
        assert hello.text == "hello /peer auth=None"
        digest, size = hashlib.sha256(), 0
        with httpx.stream("GET", f"{stack.base_url}/services/{job['id']}/{http_port}/big?n={8 * 2**20}",
                          headers=auth, timeout=60) as big:  # fmt: skip
            for chunk in big.iter_bytes():
                digest.update(chunk)
                size += len(chunk)
        assert size == 8 * 2**20 and digest.hexdigest() == expected_big(8 * 2**20)
        local, refusals = forward_in_thread(stack.base_url, key, job["id"], echo_port)
        with socket.create_connection(("127.0.0.1", local), timeout=30) as conn:
            conn.sendall(b"through two servers")
            assert conn.recv(100) == b"through two servers"
        assert refusals == []
    except AssertionError as error:
        raise AssertionError(
            f"{error}\n{dump_logs(stack)}\n===== connections\n{stack.log('connections')[-3000:]}"
        ) from None
