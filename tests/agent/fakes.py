"""A small fake of the server's agent API, spoken to over httpx.MockTransport or real HTTP."""

import json
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx

from nodes.agent import gpus
from nodes.agent.isolation import LEVELS
from nodes.agent.refusal import LocalPolicy
from nodes.agent.runtime.process import ProcessHandle, ProcessRuntime

UNIT_ID = "7b0e4c1a-2f7d-4a53-9a3e-0d5f4b6c8e21"
CREDENTIAL = "shs_node_test"
PREFIX = "/api/agent/v1"
# A unit in Germany that offers everything, like a `--dev-runtime` agent enrolled with `--country DE`.
HONOURS_ALL = LocalPolicy(country="DE", isolation_levels=frozenset(LEVELS), sandbox=True, egress=True)


class FakeServer:
    def __init__(self, heartbeat_interval_s: float = 0.1) -> None:
        self.inventory = gpus.simulate("4xH100-80GB", UNIT_ID)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.queue: deque[dict[str, Any]] = deque()
        self.to_cancel: set[str] = set()
        self.cancel_once_started = False
        # Preemption notices (`preempt` in the heartbeat answer), which older servers never send:
        # only an answer with something to preempt carries the key.
        self.to_preempt: set[str] = set()
        self.preempt_once_started = False
        # Or: preempt the started jobs once this says so (a job's own "my trap is set" file).
        self.preempt_when: Callable[[], bool] | None = None
        self.refuse_start = False
        self.refuse_enrolment = False
        self.policy: dict[str, Any] | None = None  # the owner's policy the heartbeat answer carries
        self.failures: dict[str, int] = defaultdict(int)  # path suffix -> connection errors left
        self.calls: list[tuple[str, str]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []  # the heartbeat answers
        self.started: list[str] = []
        self.start_bodies: dict[str, dict[str, Any]] = {}  # allocation id -> the start call's body
        self.samples: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        self.finished: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, dict[int, str]] = defaultdict(dict)
        self.log_cap = 2**20
        self.secrets: dict[str, dict[str, str]] = {}  # allocation id -> the values of its job's secrets
        self.registries: dict[str, Any] = {}  # allocation id -> the registry credential the answer carries
        self.secrets_status = 200  # or what POST …/secrets answers instead: 404, 409, 503
        self.staging: dict[str, list[dict[str, Any]]] = defaultdict(list)  # allocation id -> its staging reports

    def assign(
        self,
        command: list[str],
        gpu_count: int = 2,
        max_duration_s: int = 3600,
        env: dict[str, str] | None = None,
        secrets: dict[str, str] | None = None,
        image: str = "ignored:latest",
        registry: dict[str, str] | None = None,
        inputs: list[dict[str, Any]] | None = None,
        outputs: list[dict[str, Any]] | None = None,
        interruptible: bool | None = None,
    ) -> str:
        """Queue a job. Without `env` and `secrets` its assignment has neither, as from a server
        that predates them; `secrets` are the values the server keeps and hands out when asked,
        `registry` the credential for the image (`registry_auth`), handed out with them;
        `inputs` and `outputs` the job's data, which the agent stages."""
        allocation_id = str(uuid.uuid4())
        job = {
            "id": str(uuid.uuid4()),
            "image": image,
            "command": command,
            "gpu_count": gpu_count,
            "max_duration_s": max_duration_s,
            "isolation": "gpu",
            "allowed_countries": ["DE"],
        }
        if env is not None or secrets is not None:
            job |= {"env": env or {}, "secrets": sorted(secrets or {})}
            self.secrets[allocation_id] = secrets or {}
        if inputs is not None or outputs is not None:
            job |= {"inputs": inputs or [], "outputs": outputs or []}
        if interruptible is not None:
            job["interruptible"] = interruptible
        if registry is not None:
            job["registry_auth"] = True
            self.registries[allocation_id] = registry
        self.queue.append(
            {
                "allocation_id": allocation_id,
                "job": job,
                "gpus": [{"index": g.index, "uuid": g.uuid} for g in self.inventory[:gpu_count]],
                "price_per_gpu_hour_micros": 2_000_000,
            }
        )
        return allocation_id

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix(PREFIX)
        self.calls.append((request.method, path))
        for suffix, left in self.failures.items():
            if left and path.endswith(suffix):
                self.failures[suffix] -= 1
                raise httpx.ConnectError("connection refused", request=request)
        if path == "/api/schema/":  # what `doctor` asks to see that the server answers
            return httpx.Response(200, json={"openapi": "3.0.3"})
        if path == "/enrol":
            return self._enrol(json.loads(request.content))
        if request.headers.get("Authorization") != f"Bearer {CREDENTIAL}":
            return problem(401, "Missing or invalid credential.")
        body = json.loads(request.content) if request.content else {}
        return self._route(request.method, path, body)

    def _route(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        if path == "/heartbeat":
            self.heartbeats.append(body)
            return self._heartbeat_reply()
        if path == "/assignments/next":
            return httpx.Response(200, json=self.queue.popleft()) if self.queue else httpx.Response(204)
        _, _, allocation_id, action = path.split("/")
        if action == "start":
            return self._start(allocation_id, body)
        if action == "secrets":
            return self._secrets(allocation_id)
        if action == "usage":
            return self._usage(allocation_id, body["samples"])
        if action == "logs":
            return self._logs(allocation_id, body["offset"], body["data"])
        if action == "staging":
            self.staging[allocation_id].append(body)
            return httpx.Response(200, json={})
        self.finished[allocation_id] = body
        return httpx.Response(200, json={})

    def _enrol(self, body: dict[str, Any]) -> httpx.Response:
        if self.refuse_enrolment or not body.get("token"):
            return problem(400, "The enrolment token is invalid or was already used.")
        reply = {"unit_id": UNIT_ID, "credential": CREDENTIAL, "heartbeat_interval_s": 5}
        return httpx.Response(201, json=reply)

    def _heartbeat_reply(self) -> httpx.Response:
        if self.preempt_when is not None and self.preempt_when():
            self.preempt_when = None
            self.to_preempt.update(self.started)
        cancel, preempt = sorted(self.to_cancel), sorted(self.to_preempt)
        self.to_cancel.clear()
        self.to_preempt.clear()
        reply = {"status": "online", "heartbeat_interval_s": self.heartbeat_interval_s, "policy": self.policy}
        reply |= {"cancel": cancel} | ({"preempt": preempt} if preempt else {})
        self.replies.append(reply)
        return httpx.Response(200, json=reply)

    def _start(self, allocation_id: str, body: dict[str, Any]) -> httpx.Response:
        if self.refuse_start:
            return problem(409, "The job was cancelled.")
        self.started.append(allocation_id)
        self.start_bodies[allocation_id] = body
        if self.cancel_once_started:
            self.to_cancel.add(allocation_id)
        if self.preempt_once_started:
            self.to_preempt.add(allocation_id)
        return httpx.Response(200, json={})

    def _secrets(self, allocation_id: str) -> httpx.Response:
        if self.secrets_status == 200:
            registry = {"registry": self.registries[allocation_id]} if allocation_id in self.registries else {}
            return httpx.Response(200, json={"env": self.secrets.get(allocation_id, {})} | registry)
        detail = {404: "No such allocation.", 409: "This allocation has ended.", 503: "Try again."}
        return problem(self.secrets_status, detail[self.secrets_status])

    def _usage(self, allocation_id: str, samples: list[dict[str, Any]]) -> httpx.Response:
        known = self.samples[allocation_id]
        duplicates = sum(1 for s in samples if s["seq"] in known)
        known.update({s["seq"]: s for s in samples})
        return httpx.Response(200, json={"accepted": len(samples) - duplicates, "duplicates": duplicates})

    def log_text(self, allocation_id: str) -> str:
        return "".join(text for _, text in sorted(self.logs[allocation_id].items()))

    def _logs(self, allocation_id: str, offset: int, data: str) -> httpx.Response:
        room = self.log_cap - len(self.log_text(allocation_id))
        accepted = room > 0 and offset not in self.logs[allocation_id]
        if accepted:
            self.logs[allocation_id][offset] = data[:room]
        return httpx.Response(200, json={"accepted": accepted, "truncated": len(data) > room})


def problem(status: int, detail: str) -> httpx.Response:
    body = {"type": "about:blank", "title": "Error", "status": status, "detail": detail}
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json"})


class _HttpHandler(BaseHTTPRequestHandler):
    """Serves a FakeServer over real HTTP, for tests that run the agent as a process."""

    server: "_HttpServer"

    def _serve(self) -> None:
        content = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = httpx.Request(self.command, f"http://fake{self.path}", headers=dict(self.headers), content=content)
        try:
            response = self.server.fake.handle(request)
        except httpx.ConnectError:
            self.close_connection = True
            return
        self.send_response(response.status_code)
        for name in ("Content-Type", "Retry-After"):
            if name in response.headers:
                self.send_header(name, response.headers[name])
        self.send_header("Content-Length", str(len(response.content)))
        self.end_headers()
        self.wfile.write(response.content)

    do_GET = do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HttpServer(HTTPServer):
    fake: FakeServer


@contextmanager
def serving(fake: FakeServer) -> Iterator[str]:
    """Serve `fake` on a free local port; yields the base URL."""
    httpd = _HttpServer(("127.0.0.1", 0), _HttpHandler)
    httpd.fake = fake
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def wait_exit(runtime: ProcessRuntime, handle: ProcessHandle, timeout: float = 10) -> int:
    """Poll a process-runtime job until it exits; its exit code."""
    deadline = time.monotonic() + timeout
    while (code := runtime.poll(handle)) is None:
        assert time.monotonic() < deadline, "the job did not exit"
        time.sleep(0.02)
    return code
