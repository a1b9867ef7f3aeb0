"""The renter CLI's only HTTP code: one method per public API call, and readable errors."""

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

API_PREFIX = "/api/v1"
VERSION = "0.1.0"

# The seam for tests: an httpx transport (WSGI or mock) used instead of the network.
transport: httpx.BaseTransport | None = None
# Busy (429) or briefly unavailable (503): asked again this many times, after the server's
# Retry-After (at least a doubling backoff, at most MAX_WAIT_S). Submits carry an Idempotency-Key,
# so asking again never makes a second job.
RETRIES = 3
MAX_WAIT_S = 30.0
sleep = time.sleep  # the tests' seam


class CliError(Exception):
    """A call failed; the message is meant for a person."""


class Unreachable(CliError):
    pass


class ApiError(CliError):
    """The server answered with an error, usually a problem+json document."""

    def __init__(self, status: int, problem: dict[str, Any], call: str) -> None:
        self.status = status
        self.problem = problem
        super().__init__(problem_text(status, problem, call))


def problem_text(status: int, problem: dict[str, Any], call: str) -> str:
    title = problem.get("title") or "Error"
    lines = [f"{title} ({status}) on {call}"]
    if problem.get("detail"):
        lines[0] += f": {problem['detail']}"
    lines += [f"  {field}: {message}" for field, message in _field_errors(problem.get("errors"))]
    if status == 401:
        lines.append("  Check the API key: run `shedshare login` again, or set SHEDSHARE_API_KEY.")
    return "\n".join(lines)


def _field_errors(errors: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(errors, dict):
        for field, value in errors.items():
            yield from _field_errors(value, f"{prefix}.{field}" if prefix else str(field))
    elif isinstance(errors, list) and all(isinstance(item, str) for item in errors):
        yield prefix or "error", " ".join(errors)
    elif isinstance(errors, list):
        for index, value in enumerate(errors):
            yield from _field_errors(value, f"{prefix}[{index}]")
    elif errors:
        yield prefix or "error", str(errors)


class RenterClient:
    def __init__(self, url: str, key: str, *, timeout_s: float = 30.0) -> None:
        self._timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=url.rstrip("/") + API_PREFIX,
            headers={"Authorization": f"Bearer {key}", "User-Agent": f"shedshare-cli/{VERSION}"},
            timeout=timeout_s,
            transport=transport,
        )

    def __enter__(self) -> "RenterClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def balance(self) -> dict[str, Any]:
        return self._get("/balance")

    def offers(self, query: str, *, sort: str | None, limit: int) -> list[dict[str, Any]]:
        # The server pages at most 200 offers; `next` links fetch the rest up to `limit`.
        params = {"q": query, "limit": min(limit, 200)} | ({"sort": sort} if sort else {})
        return list(self._pages("/offers", params, limit=limit))

    def jobs(self, *, state: str | None) -> list[dict[str, Any]]:
        # The state filter is sent for the server and applied here too, so the answer is right
        # whether or not the server filters.
        jobs = self._pages("/jobs", {"state": state} if state else {})
        return [job for job in jobs if state is None or job.get("state") == state]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._get(f"/jobs/{quote(job_id, safe='')}")

    def submit(self, spec: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
        return self._call("POST", "/jobs", json=spec, headers={"Idempotency-Key": idempotency_key})

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{quote(job_id, safe='')}/cancel")

    def logs(self, job_id: str, *, offset: int, wait_s: int) -> dict[str, Any]:
        params = {"offset": offset, "wait": wait_s}
        return self._get(f"/jobs/{quote(job_id, safe='')}/logs", params, timeout=wait_s + self._timeout_s)

    def residency(self, job_id: str) -> dict[str, Any]:
        return self._get(f"/jobs/{quote(job_id, safe='')}/residency")

    def secrets(self) -> list[dict[str, Any]]:
        return self._get("/secrets")

    def secret_set(self, name: str, value: str) -> dict[str, Any]:
        return self._call("PUT", f"/secrets/{quote(name, safe='')}", json={"value": value})

    def secret_delete(self, name: str) -> None:
        self._call("DELETE", f"/secrets/{quote(name, safe='')}")

    def templates(self) -> list[dict[str, Any]]:
        return self._get("/templates")

    def template(self, name: str) -> dict[str, Any]:
        return self._get(f"/templates/{quote(name, safe='')}")

    def template_save(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", f"/templates/{quote(name, safe='')}", json=spec)

    def template_delete(self, name: str) -> None:
        self._call("DELETE", f"/templates/{quote(name, safe='')}")

    def _pages(self, path: str, params: dict[str, Any], *, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Follow `next` links (limit/offset or cursor pagination alike) until the end or `limit`."""
        page = self._get(path, params)
        count = 0
        while True:
            for item in page.get("results", []):
                yield item
                count += 1
                if limit is not None and count >= limit:
                    return
            if not page.get("next"):
                return
            page = self._get(page["next"])

    def _get(self, path: str, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return self._call("GET", path, params=params, **kwargs)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        request = self._http.build_request(method, path, **kwargs)
        where = request.url.copy_with(query=None)
        call = f"{method} {where}"
        for attempt in range(RETRIES + 1):
            try:
                response = self._http.send(request)
            except httpx.TimeoutException:
                raise Unreachable(f"could not reach {where}: timed out") from None
            except httpx.TransportError as exc:
                raise Unreachable(f"could not reach {where}: {exc or type(exc).__name__}") from None
            if response.status_code not in (429, 503) or attempt == RETRIES:
                break
            sleep(_wait_s(response, attempt))
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success:
            if body is None:
                raise CliError(f"{call}: the server's answer is not JSON")
            return body
        problem = body if isinstance(body, dict) else {"title": response.reason_phrase, "detail": response.text[:200]}
        raise ApiError(response.status_code, problem, call)


def _wait_s(response: httpx.Response, attempt: int) -> float:
    try:
        asked = float(response.headers.get("Retry-After", ""))
    except ValueError:
        asked = 0.0
    return min(max(asked, 2.0**attempt), MAX_WAIT_S)
