"""An agent API call that came over a stream, answered by the same Django views, middleware,
authentication, throttles and error handling as over HTTP: the stream is only a transport.

Unlike an HTTP request, a call does not send Django's request_started and request_finished
signals: they hand the thread's database connection back after every request (and check it
again before the next), which costs two trips to the database on every report. The connection
servers' pool threads keep theirs instead (``connections_tidy``)."""

import io
import json
import sys

from django.core.handlers.wsgi import WSGIHandler, WSGIRequest
from django.db import connections, reset_queries
from django.urls import set_script_prefix

from marketplace.jobs.agent_api.auth import STREAM_CALL
from nodes.agent.protocol import API_PREFIX

# Headers of the WebSocket handshake that describe the connection itself, not the calls over it.
_HANDSHAKE_ONLY = {"connection", "upgrade", "content-length", "content-type", "transfer-encoding"}

_handler: WSGIHandler | None = None


def environ_base(scope: dict) -> dict:
    """What every call of one stream shares, from its handshake: the client's address as the
    server saw it, its headers (Host, Authorization, X-Forwarded-*), the scheme."""
    environ = {
        "SCRIPT_NAME": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "QUERY_STRING": "",
        "wsgi.url_scheme": "https" if scope.get("scheme") in ("wss", "https") else "http",
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        STREAM_CALL: True,
    }
    client, server = scope.get("client") or ("", 0), scope.get("server") or ("localhost", 80)
    environ["REMOTE_ADDR"] = client[0] if client else ""
    environ["SERVER_NAME"], environ["SERVER_PORT"] = str(server[0]), str(server[1])
    for raw_name, raw_value in scope.get("headers") or []:
        name = raw_name.decode("latin-1").lower()
        if name in _HANDSHAKE_ONLY or name.startswith("sec-websocket-"):
            continue
        key = "HTTP_" + name.upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def call(base: dict, method: str, path: str, body) -> tuple[int, object, float | None]:
    """Answer one call as the HTTP API would: (status, JSON body or None, Retry-After or None)."""
    global _handler
    if _handler is None:
        _handler = WSGIHandler()
    data = json.dumps(body).encode()
    environ = {
        **base,
        "REQUEST_METHOD": method,
        "PATH_INFO": f"{API_PREFIX}/{path}",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(data)),
        "wsgi.input": io.BytesIO(data),
    }
    set_script_prefix("")
    reset_queries()
    response = _handler.get_response(WSGIRequest(environ))
    content = response.content  # the agent API's answers are JSON, made whole: nothing to close
    try:
        answer = json.loads(content) if content else None
    except ValueError:  # not JSON (an error page): what the agent needs is the status
        answer = {"title": response.reason_phrase, "status": response.status_code}
    retry_after = response.headers.get("Retry-After")
    return response.status_code, answer, float(retry_after) if retry_after and retry_after.isdigit() else None


def connections_tidy() -> None:
    """After a pool thread's database work: keep its connections for the next (a connection
    server's threads are few and long-lived, so they hold one each, as a Celery worker does),
    but close one that failed and no longer answers (the database restarted: the next call
    connects afresh) or was left inside a transaction."""
    for connection in connections.all(initialized_only=True):
        if connection.connection is None:
            continue
        if connection.in_atomic_block or not connection.get_autocommit():
            connection.close()
        elif connection.errors_occurred:
            if connection.is_usable():
                connection.errors_occurred = False
            else:
                connection.close()
