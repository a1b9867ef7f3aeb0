"""The data path's throughput: the agent's own upload and fetch (``nodes/agent/staging.py``)
against a real S3-compatible server on loopback (moto's server mode, its own process), beside a
plain copy of the same bytes on the same disk.

One file of ``--size-mb`` random bytes is written under a scratch folder; the agent's ``upload``
PUTs it to a presigned URL (``upload_mb_s``), its ``fetch`` GETs it back through another
presigned URL into the scratch's inputs, checking the SHA-256 the upload measured
(``fetch_mb_s``), and ``shutil.copyfile`` copies it once more (``raw_copy_mb_s``). The three
move the same bytes between the same disk and, for the first two, the same loopback server, so
the ratios show what the agent's streaming, hashing and HTTP cost. The S3 server runs on the same
two cores and keeps the object in memory, so its own work is in the figures too.
"""

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

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
            s3.client().create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
            allow = {s3.host}
            output = {"path": "data.bin", "url": s3.presign("PUT", BUCKET, "data.bin"), "jurisdiction": "DE"}
            started = time.perf_counter()
            uploaded = staging.upload(output, scratch, client=client, allow=allow)
            upload_s = time.perf_counter() - started

            item = {"path": "data.bin", "url": s3.presign("GET", BUCKET, "data.bin"), "jurisdiction": "DE",
                    "sha256": uploaded.sha256, "size": uploaded.size}  # fmt: skip
            started = time.perf_counter()
            fetched = staging.fetch(item, scratch, client=client, allow=allow, limit_bytes=2 * size)
            fetch_s = time.perf_counter() - started

        started = time.perf_counter()
        shutil.copyfile(source, root / "raw-copy.bin")
        copy_s = time.perf_counter() - started
        mb = size / (1024 * 1024)
        fetch_mb_s, upload_mb_s, raw_mb_s = mb / fetch_s, mb / upload_s, mb / copy_s
        return {
            "size_mb": size_mb,
            "fetch_mb_s": round(fetch_mb_s, 1),
            "upload_mb_s": round(upload_mb_s, 1),
            "raw_copy_mb_s": round(raw_mb_s, 1),
            "fetch_vs_raw": round(fetch_mb_s / raw_mb_s, 3),
            "upload_vs_raw": round(upload_mb_s / raw_mb_s, 3),
            "sha256_intact": uploaded.sha256 == expected == fetched.sha256,
            "cpus": os.cpu_count(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
