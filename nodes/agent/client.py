"""The agent's only HTTP code: one method per agent API call, one exception type per failure."""

from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx

from nodes.agent import __version__, protocol
from nodes.agent.protocol import API_PREFIX
from nodes.agent.stream import Stream, StreamUnavailable


class AgentError(Exception):
    """A call failed. `retryable` says whether the same call may succeed later."""

    retryable = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(AgentError):
    """No HTTP answer: connection refused, DNS, timeout."""

    retryable = True


class AuthError(AgentError):
    # Retried because a wrong or rotated credential is fixed by a person, and dropping usage
    # reports in the meantime would lose the owner's money.
    retryable = True


class NotFound(AgentError):
    pass


class Conflict(AgentError):
    pass


class BadRequest(AgentError):
    pass


class ServerError(AgentError):
    retryable = True


class RateLimited(AgentError):
    retryable = True

    def __init__(self, message: str, *, status: int | None = None, retry_after: float = 0.0):
        super().__init__(message, status=status)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Enrolment:
    unit_id: str
    credential: str
    heartbeat_interval_s: float


class AgentClient:
    def __init__(
        self,
        url: str,
        credential: str | None = None,
        *,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        stream: "Stream | None" = None,
    ) -> None:
        # The stream, when given, carries the calls it can while it is up (heartbeats and
        # allocation reports): same answers, same errors; HTTP carries them otherwise.
        self.stream = stream
        headers = {"User-Agent": f"shedshare-agent/{__version__}"}
        if credential:
            headers["Authorization"] = f"Bearer {credential}"
        self._timeout_s = timeout_s
        self._root = url.rstrip("/")
        self._http = httpx.Client(
            base_url=url.rstrip("/") + API_PREFIX,
            headers=headers,
            timeout=timeout_s,
            transport=transport,
        )

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self._http.close()

    def enrol(self, *, token: str, hostname: str, agent_version: str = __version__) -> Enrolment:
        body = {"token": token, "hostname": hostname, "agent_version": agent_version}
        data = _json(self._call("POST", "/" + protocol.ENROL, json=body))
        try:
            return Enrolment(
                unit_id=str(data["unit_id"]),
                credential=str(data["credential"]),
                heartbeat_interval_s=float(data.get("heartbeat_interval_s", 5)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ServerError(f"POST /{protocol.ENROL}: malformed answer ({exc!r})") from None

    def heartbeat(
        self,
        *,
        gpus: list[dict[str, Any]],
        running: list[str],
        advertise: list[str] | None = None,
        limits: dict[str, Any] | None = None,
        country: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"gpus": gpus, "running": running, "agent_version": __version__}
        if advertise is not None:
            body |= {"advertise": advertise, "limits": limits or {}}
        if country:
            body["country"] = country
        return _json(self._call("POST", "/" + protocol.HEARTBEAT, json=body))

    def next_assignment(self, *, wait_s: int) -> dict[str, Any] | None:
        """Long-poll for work; None means the server has none for us (204)."""
        path = "/" + protocol.NEXT_ASSIGNMENT
        response = self._call("GET", path, params={"wait": wait_s}, timeout=wait_s + self._timeout_s)
        return None if response.status_code == 204 else _json(response)

    def start(self, allocation_id: str, image_digest: str | None = None, runs_in: str = "") -> None:
        """Confirm the start, naming the digest of the image the job runs from (sha256:…) where
        it has one, and what it runs in (`protocol.RunsIn`); the server refuses a digest other
        than the one a job is pinned to (409)."""
        body = {"image_digest": image_digest} if image_digest else {}
        if runs_in:
            body["runs_in"] = runs_in
        self._call("POST", _allocation(allocation_id, "start"), json=body)

    def secrets(self, allocation_id: str) -> dict[str, Any]:
        """The values of the job's secrets, as {"env": {name: value}}: to be kept in memory only."""
        return _json(self._call("POST", _allocation(allocation_id, "secrets"), json={}))

    def usage(self, allocation_id: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return _json(self._call("POST", _allocation(allocation_id, "usage"), json={"samples": samples}))

    def logs(self, allocation_id: str, *, offset: int, data: str) -> dict[str, Any]:
        path = _allocation(allocation_id, "logs")
        return _json(self._call("POST", path, json={"offset": offset, "data": data}))

    def finish(self, allocation_id: str, *, exit_code: int | None, reason: str) -> None:
        path = _allocation(allocation_id, "finish")
        self._call("POST", path, json={"exit_code": exit_code, "reason": reason})

    def staging(self, allocation_id: str, report: dict[str, Any]) -> None:
        """What the agent did with the job's data in one phase (`staging.report`), for the record."""
        self._call("POST", _allocation(allocation_id, "staging"), json=report)

    def server_date(self) -> datetime | None:
        """The time in the Date header of the server's OpenAPI schema, a page it serves to anyone.

        Used by `doctor` to tell whether the server answers and whether our clock agrees with it.
        """
        response = self._call("GET", f"{self._root}/api/schema/")
        try:
            return parsedate_to_datetime(response.headers["Date"])
        except (KeyError, TypeError, ValueError):
            return None

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._over_stream(method, path, kwargs.get("json"))
        try:
            response = response or self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise Unreachable(f"{method} {path}: timed out") from None
        except httpx.TransportError as exc:
            raise Unreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if response.is_success:
            return response
        raise error_for(response, f"{method} {path}")

    def _over_stream(self, method: str, path: str, body: Any) -> httpx.Response | None:
        """The call's answer over the stream, as an HTTP response; None to make it over HTTP.
        A call the stream dropped may have been served: every agent call is safe to repeat."""
        if self.stream is None or not self.stream.connected or method != "POST" or not isinstance(body, dict):
            return None
        relative = path.removeprefix("/")
        if relative != protocol.HEARTBEAT and not relative.startswith("allocations/"):
            return None
        try:
            status, answer, retry_after = self.stream.call(relative, body, timeout_s=self._timeout_s)
        except StreamUnavailable:
            return None
        headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else {}
        request = httpx.Request(method, self._http.base_url.join(relative))
        return httpx.Response(status, json=answer, headers=headers, request=request)


def _allocation(allocation_id: str, action: str) -> str:
    # The id came from the server; quoted so that no id can reach another path.
    return "/" + protocol.allocation_path(quote(allocation_id, safe=""), action)


def error_for(response: httpx.Response, call: str) -> AgentError:
    status = response.status_code
    message = f"{call}: {status} {_problem_text(response)}"
    if status in (401, 403):
        return AuthError(message, status=status)
    if status == 404:
        return NotFound(message, status=status)
    if status == 409:
        return Conflict(message, status=status)
    if status in (429, 503):
        return RateLimited(message, status=status, retry_after=_retry_after(response))
    if status >= 500:
        return ServerError(message, status=status)
    return BadRequest(message, status=status)


def _problem_text(response: httpx.Response) -> str:
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        return response.reason_phrase or response.text[:200]
    text = str(problem.get("detail") or problem.get("title") or response.reason_phrase)
    if problem.get("errors"):
        text += f" {problem['errors']}"
    return text


def _retry_after(response: httpx.Response) -> float:
    # Only the delta-seconds form; an HTTP date falls back to our own backoff.
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return 0.0


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ServerError(f"{response.request.url.path}: expected a JSON object")
    return data
