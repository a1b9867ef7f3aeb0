"""The data path's throughput: the agent's own upload and fetch (``nodes/agent/staging.py``)
against a real S3-compatible server on loopback (moto's server mode, its own process), beside a
plain copy of the same bytes on the same disk.

One file of ``--size-mb`` random bytes is written under a scratch folder; the agent's ``upload``
PUTs it to a presigned URL (``upload_mb_s``), its ``fetch`` GETs it back through another
presigned URL into the scratch's inputs, checking the SHA-256 the upload measured
(``fetch_mb_s``), and ``shutil.copyfile`` copies it once more (``raw_copy_mb_s``). The three
move the same bytes between the same disk and, for the first two, the same loopback server, so
the ratios show what the agent's streaming, hashing and HTTP cost. The S3 server runs on the same
two cores and keeps the object in memory, so its own work is in the figures too: the same URLs
moved by a bare ``http.client`` (no hashing, nothing written) give the store's own pace
(``store_get_mb_s``, ``store_put_mb_s``), which no client of it can pass, and ``sha256_mb_s`` is
the pace of hashing alone on one core, which bounds any path that checks what it moves.
"""

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from marketplace.devtools.s3 import REGION, s3_server
from nodes.agent import staging

HELP = "The agent's data path against a local S3 server: fetch and upload MB/s beside a raw copy."
BUCKET = "bench-staging"
CHUNK = 8 * 1024 * 1024


def add_arguments(parser) -> None:
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the file moved, MiB")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a new temporary one)")


def _write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(CHUNK)  # one random block, varied per chunk so nothing compresses or dedups
    with open(path, "wb") as out:
        written = 0
        while written < size:
            chunk = (written.to_bytes(8, "big") + block)[: min(CHUNK, size - written)]
            out.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    return digest.hexdigest()


def _connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=600), f"{parts.path}?{parts.query}"


def _bare_put(url: str, source: Path, size: int) -> None:
    connection, target = _connection(url)
    connection.putrequest("PUT", target)
    connection.putheader("Content-Length", str(size))
    connection.endheaders()
    with open(source, "rb") as data:
        while block := data.read(CHUNK):
            connection.send(block)
    answer = connection.getresponse()
    answer.read()
    connection.close()
    if answer.status != 200:
        raise RuntimeError(f"the store answered {answer.status} to a bare PUT")


def _bare_get(url: str, size: int) -> None:
    connection, target = _connection(url)
    connection.request("GET", target)
    answer, received = connection.getresponse(), 0
    while block := answer.read(CHUNK):
        received += len(block)
    connection.close()
    if answer.status != 200 or received != size:
        raise RuntimeError(f"the store answered {answer.status} with {received} bytes to a bare GET")


def _sha256_mb_s(size: int) -> float:
    block, digest = os.urandom(CHUNK), hashlib.sha256()
    started = time.perf_counter()
    for _ in range(max(1, size // CHUNK)):
        digest.update(block)
    return max(1, size // CHUNK) * CHUNK / 2**20 / (time.perf_counter() - started)


def _timed(work) -> tuple:
    """What `work()` returns, and the seconds it took."""
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def _urls(s3) -> tuple[dict, str]:
    """A fresh store's bucket: the output item to PUT data.bin to, and the URL to GET it back."""
    s3.client().create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    output = {"path": "data.bin", "url": s3.presign("PUT", BUCKET, "data.bin"), "jurisdiction": "DE"}
    return output, s3.presign("GET", BUCKET, "data.bin")


def run(**options) -> dict:
    size_mb = options["size_mb"]
    if size_mb < 1:
        raise ValueError("--size-mb must be at least 1.")
    size = size_mb * 1024 * 1024
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its lines carry the URLs' signatures
    root = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=options["dir"]))
    try:
        scratch = root / "scratch"
        (scratch / "outputs").mkdir(parents=True)
        source = scratch / "outputs" / "data.bin"
        expected = _write_random(source, size)
        with s3_server() as s3, staging.new_client() as client:
            output, get_url = _urls(s3)
            allow = {s3.host}
            uploaded, upload_s = _timed(lambda: staging.upload(output, scratch, client=client, allow=allow))
            item = {"path": "data.bin", "url": get_url, "jurisdiction": "DE",
                    "sha256": uploaded.sha256, "size": uploaded.size}  # fmt: skip
            fetched, fetch_s = _timed(
                lambda: staging.fetch(item, scratch, client=client, allow=allow, limit_bytes=2 * size)
            )
        # The store's own pace: the same moves by a bare client, without hashing or a disk, into
        # a store as fresh as the agent's was (moto slows as it holds more).
        with s3_server() as s3:
            output, get_url = _urls(s3)
            _, store_put_s = _timed(lambda: _bare_put(output["url"], source, size))
            _, store_get_s = _timed(lambda: _bare_get(get_url, size))

        _, copy_s = _timed(lambda: shutil.copyfile(source, root / "raw-copy.bin"))
        mb = size / (1024 * 1024)
        fetch_mb_s, upload_mb_s, raw_mb_s = mb / fetch_s, mb / upload_s, mb / copy_s
        return {
            "size_mb": size_mb,
            "fetch_mb_s": round(fetch_mb_s, 1),
            "upload_mb_s": round(upload_mb_s, 1),
            "raw_copy_mb_s": round(raw_mb_s, 1),
            "fetch_vs_raw": round(fetch_mb_s / raw_mb_s, 3),
            "upload_vs_raw": round(upload_mb_s / raw_mb_s, 3),
            "store_get_mb_s": round(mb / store_get_s, 1),
            "store_put_mb_s": round(mb / store_put_s, 1),
            "fetch_vs_store": round(store_get_s / fetch_s, 3),
            "upload_vs_store": round(store_put_s / upload_s, 3),
            "sha256_mb_s": round(_sha256_mb_s(min(size, 256 * 2**20)), 1),
            "sha256_intact": uploaded.sha256 == expected == fetched.sha256,
            "cpus": os.cpu_count(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
