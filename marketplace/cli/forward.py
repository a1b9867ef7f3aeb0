"""``shedshare forward``: a local port that reaches a port of a running job, like
``kubectl port-forward``. Each connection accepted locally is one WebSocket to the marketplace's
forward endpoint (``/api/v1/jobs/<job>/ports/<port>/forward``), whose binary messages are the TCP
stream, relayed over the shed's own outbound connection.
"""

import asyncio
import contextlib
from collections.abc import Callable

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

CHUNK = 256 * 1024
CLOSE_BASE = 4000  # a refused tunnel closes with 4000 + the HTTP status it would have had


class ForwardRefused(Exception):
    pass


def forward_url(base_url: str, job_id: str, port: int) -> str:
    base = base_url.rstrip("/")
    base = "wss://" + base[len("https://") :] if base.startswith("https://") else "ws://" + base.removeprefix("http://")
    return f"{base}/api/v1/jobs/{job_id}/ports/{port}/forward"


async def tunnel(url: str, key: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Move one local connection's bytes through the marketplace until either side ends.
    Raises ForwardRefused when the marketplace will not open it."""
    try:
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=2**22, compression=None)
    except InvalidStatus as exc:
        raise ForwardRefused(f"HTTP {exc.response.status_code}") from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise ForwardRefused(f"cannot reach the marketplace: {exc}") from None

    async def outward() -> None:  # local -> job
        while data := await reader.read(CHUNK):
            await ws.send(data)
        await ws.close()

    async def inward() -> None:  # job -> local
        async for message in ws:
            writer.write(message if isinstance(message, bytes) else message.encode())
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    tasks = [asyncio.ensure_future(outward()), asyncio.ensure_future(inward())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if tasks[1].done():
            tasks[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await ws.close()
        writer.close()
    code = ws.close_code or 1000
    if code >= CLOSE_BASE:
        raise ForwardRefused(f"{code - CLOSE_BASE}: {ws.close_reason}")


async def serve(
    base_url: str, key: str, job_id: str, port: int, local_port: int, *,
    ready: Callable[[int], None], refused: Callable[[str], None], bind: str = "127.0.0.1",
) -> None:  # fmt: skip
    """Listen on ``bind:local_port`` (0: any free port; ``ready`` gets the port) until cancelled."""
    url = forward_url(base_url, job_id, port)

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await tunnel(url, key, reader, writer)
        except ForwardRefused as exc:
            refused(str(exc))
            writer.close()
        except (ConnectionClosed, OSError):
            writer.close()

    server = await asyncio.start_server(accepted, bind, local_port)
    ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()
