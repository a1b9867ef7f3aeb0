"""The outer layer of the ASGI application: a request body over DATA_UPLOAD_MAX_MEMORY_SIZE is a
413 problem before Django reads it. (Django's ASGI handler reads any body whole, spooling it to
disk, before a view or a parser could refuse it.)"""

import json

from django.conf import settings

from marketplace.kernel.api.errors import PROBLEM_CONTENT_TYPE, problem, too_large_detail


async def _too_large(send) -> None:
    body = json.dumps(problem(413, "payload-too-large", too_large_detail())).encode()
    headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def body_limit(app):
    """``app`` behind a cap on the request body, declared (Content-Length) or counted (chunked)."""

    async def application(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and (len(declared) > 15 or int(declared) > limit):
            return await _too_large(send)
        received, size = [], 0
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break  # the client went away; Django sees that too
            size += len(message.get("body", b""))
            if size > limit:
                return await _too_large(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return received.pop(0) if received else await receive()

        return await app(scope, replay, send)

    return application


def with_websockets(app, routes: dict, *, on_shutdown=None):
    """``app`` (Django, HTTP only) with WebSocket paths served by their own ASGI applications;
    any other WebSocket is refused (a 403 to the handshake). Answers the lifespan protocol,
    running ``on_shutdown`` (a coroutine function) when the server stops."""

    async def application(scope, receive, send):
        if scope["type"] == "websocket":
            route = routes.get(scope.get("path", ""))
            if route is None:
                await receive()
                return await send({"type": "websocket.close", "code": 1008})
            return await route(scope, receive, send)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if on_shutdown is not None:
                        await on_shutdown()
                    return await send({"type": "lifespan.shutdown.complete"})
        return await app(scope, receive, send)

    return application
