"""The renter's own S3-compatible storage, seen from the CLI.

A job file's inputs and outputs may name objects as ``s3://bucket/key``: `submit` presigns each
with the renter's own credentials (whatever botocore reads: ``AWS_ACCESS_KEY_ID`` and friends,
``~/.aws``, and ``AWS_ENDPOINT_URL`` for a store other than AWS), a GET for an input and a PUT for
an output, so the marketplace and the shed get URLs good for that one object and never a
credential. `output get` fetches what a job uploaded, through a presigned GET of the destination
the job declared, and checks it against the size and SHA-256 its shed's agent recorded.

botocore is optional (``pip install 'shedshare-cli[s3]'``): without it, a job file of plain
HTTPS URLs works as before.
"""

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import click
import httpx

# SigV4's longest validity: a job may queue, and its outputs are uploaded only when it ends.
PRESIGN_EXPIRES_S = 7 * 24 * 3600
CHUNK = 2**20


def endpoint(url: str) -> str:
    """The URL without its query (the signature), as the server records it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise click.ClickException(f"{url}: write s3://BUCKET/KEY")
    return bucket, key


def _s3_client():
    try:
        import botocore.session
        from botocore.config import Config
    except ImportError:
        raise click.ClickException(
            "s3:// URLs need botocore: pip install 'shedshare-cli[s3]' (or use presigned https:// URLs)"
        ) from None
    session = botocore.session.get_session()
    if session.get_credentials() is None:
        raise click.ClickException(
            "s3:// URLs are presigned with your storage's credentials: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a store other than AWS), or configure ~/.aws"
        )
    return session.create_client("s3", config=Config(signature_version="s3v4"))


class Storage:
    """A botocore S3 client made on first use: nothing is imported for a job without s3:// URLs."""

    def __init__(self) -> None:
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = _s3_client()
        return self._client

    def presign(self, method: str, bucket: str, key: str) -> str:
        operation = {"GET": "get_object", "PUT": "put_object"}[method]
        return self.client.generate_presigned_url(
            operation, Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_EXPIRES_S
        )

    def object_of(self, declared: str) -> tuple[str, str]:
        """The bucket and key behind an endpoint this store serves (path-style or
        virtual-hosted), checked by presigning it again: an endpoint of another store is refused."""
        parts = urlsplit(declared)
        path = unquote(parts.path.lstrip("/"))
        first, _, rest = path.partition("/")
        candidates = [(first, rest)] if first and rest else []
        if path and "." in (parts.hostname or ""):
            candidates.append(((parts.hostname or "").split(".", 1)[0], path))
        for bucket, key in candidates:
            if endpoint(self.presign("GET", bucket, key)) == declared:
                return bucket, key
        where = self.client.meta.endpoint_url
        raise click.ClickException(
            f"{declared} is not an object of the store your credentials reach ({where}); "
            "fetch it with that store's own tools"
        )


def presign_spec(spec: dict[str, Any], storage: Storage) -> dict[str, Any]:
    """The spec with every ``s3://`` input presigned for GET and output for PUT."""
    spec = dict(spec)
    for field, method in (("inputs", "GET"), ("outputs", "PUT")):
        items = spec.get(field)
        if not isinstance(items, list):
            continue
        presigned = []
        for item in items:
            url = item.get("url") if isinstance(item, dict) else None
            if isinstance(url, str) and url.startswith("s3://"):
                item = {**item, "url": storage.presign(method, *split_s3(url))}
            presigned.append(item)
        spec[field] = presigned
    return spec


def uses_s3(spec: dict[str, Any]) -> bool:
    return any(
        isinstance(item, dict) and str(item.get("url", "")).startswith("s3://")
        for field in ("inputs", "outputs")
        for item in (spec.get(field) if isinstance(spec.get(field), list) else [])
    )


def job_outputs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each declared output with what the last successful upload recorded of it (size, SHA-256,
    when), or None where no upload succeeded: from the job's residency record."""
    outputs = record.get("data", {}).get("outputs", {})
    uploaded: dict[str, dict[str, Any]] = {}
    for staging in outputs.get("staged", []):
        for file in staging.get("files", []):
            uploaded[file["path"]] = {**file, "at": staging.get("at")}
    return [{**item, "uploaded": uploaded.get(item["path"])} for item in outputs.get("declared", [])]


def download(url: str, target: Path, *, size: int, sha256: str) -> None:
    """Stream the object into `target`, written only if its size and SHA-256 are the recorded ones."""
    partial = target.with_name(f".{target.name}.partial")
    digest, received = hashlib.sha256(), 0
    try:
        with httpx.stream("GET", url, timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=False) as response:
            if response.status_code != 200:
                raise click.ClickException(f"{endpoint(url)}: the store answered {response.status_code}")
            with open(partial, "wb") as out:
                for chunk in response.iter_raw(CHUNK):
                    received += len(chunk)
                    if received > size:
                        raise click.ClickException(f"{endpoint(url)}: more than the {size} bytes the shed uploaded")
                    digest.update(chunk)
                    out.write(chunk)
    except httpx.HTTPError as exc:
        partial.unlink(missing_ok=True)
        raise click.ClickException(f"{endpoint(url)}: {type(exc).__name__}: {exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if received != size or digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise click.ClickException(
            f"{endpoint(url)}: {received} bytes with SHA-256 {digest.hexdigest()}, but the shed uploaded "
            f"{size} bytes with SHA-256 {sha256}: the object changed since; nothing written"
        )
    os.replace(partial, target)
