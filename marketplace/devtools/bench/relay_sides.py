"""The two far ends of ``bench relay``, each run as its own process:

python -m marketplace.devtools.bench.relay_sides job PORT
    an HTTP/1.1 server with keep-alive on 127.0.0.1:PORT: GET /bytes/N answers N bytes,
    sent in 256 KiB writes (what a job's model server streams);
python -m marketplace.devtools.bench.relay_sides agent URL CREDENTIAL JOB_PORT
    the real agent's stream (nodes/agent/stream.py) to the connection server at URL, with
    its relay reaching every port at 127.0.0.1:JOB_PORT; prints "ready" once connected, and
    ends when its stdin closes.
"""

import asyncio
import sys

CHUNK = 256 * 1024
_BLOCK = bytes(range(256)) * (CHUNK // 256)


async def _job(port: int) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                size = int(target.rsplit("/", 1)[1]) if target.startswith("/bytes/") else 0
                status = b"200 OK" if target.startswith("/bytes/") else b"404 Not Found"
                writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n"
                             % (status, size))  # fmt: skip
                while size > 0:
                    piece = _BLOCK[: min(size, CHUNK)]
                    writer.write(piece)
                    size -= len(piece)
                    await writer.drain()
                await writer.drain()
                if b"connection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def _agent(url: str, credential: str, job_port: int) -> None:
    from nodes.agent.stream import Stream, wait_connected

    stream = Stream(url, credential)
    stream.serve_ports(lambda allocation, port: ("127.0.0.1", job_port))
    stream.start()
    if not wait_connected(stream, 60.0):
        sys.exit(f"agent: no stream to {url}: {stream.state}")
    print("ready", flush=True)
    sys.stdin.read()
    stream.close()


if __name__ == "__main__":
    if sys.argv[1] == "job":
        asyncio.run(_job(int(sys.argv[2])))
    else:
        _agent(sys.argv[2], sys.argv[3], int(sys.argv[4]))
