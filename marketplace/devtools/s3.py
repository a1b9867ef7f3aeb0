"""A real S3-compatible server on loopback (moto's server mode, its own process) for the data
path's tests and ``bench staging``: buckets, objects and presigned URLs as S3 serves them."""

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

REGION = "eu-central-1"
START_TIMEOUT_S = 60.0


@dataclass
class S3:
    endpoint: str  # http://127.0.0.1:PORT
    host: str  # 127.0.0.1:PORT, for JOB_DATA_PRIVATE_HOSTS and the agent's data_private_hosts

    @classmethod
    def on_port(cls, port: int) -> "S3":
        return cls(endpoint=f"http://127.0.0.1:{port}", host=f"127.0.0.1:{port}")

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id="testing", aws_secret_access_key="testing",  # noqa: S106 - moto takes any
        )  # fmt: skip

    def presign(self, method: str, bucket: str, key: str, *, expires_s: int = 3600) -> str:
        operation = {"GET": "get_object", "PUT": "put_object"}[method]
        return self.client().generate_presigned_url(
            operation, Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )


def server_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def wait_ready(endpoint: str, *, alive=lambda: True, timeout: float = START_TIMEOUT_S) -> None:
    """Until the server at `endpoint` answers; `alive()` false means its process has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise RuntimeError("moto's S3 server exited before it answered")
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=2)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not answer in time") from None
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_server(log_path=None) -> Iterator[S3]:
    """Start moto's server on a free loopback port; stop it on leaving."""
    port = _free_port()
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    process = subprocess.Popen(server_argv(port), stdout=log, stderr=log)
    store = S3.on_port(port)
    try:
        wait_ready(store.endpoint, alive=lambda: process.poll() is None)
        yield store
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_path:
            log.close()
