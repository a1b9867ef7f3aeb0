"""The job's data, moved by the agent and never by the job (``protocol.Staging``): its inputs
fetched into ``<scratch>/inputs/<path>`` before the start, its outputs uploaded from
``<scratch>/outputs/<path>`` after the exit. Only the URLs the job declared, each streamed in
large chunks and hashed on the way, so a file is read or written once.

The agent connects with the owner's network position, so, as for an image's registry
(`images.py`), an endpoint on a loopback, private or link-local address, or over plain HTTP, is
refused unless the owner lists it, and a redirect is never followed (a public URL must not send
the agent inside). The name is looked up before the fetch and again by the connection, so the
owner's list, not the lookup, is what keeps a hostile name out. The environment's proxy settings
are ignored: through a proxy the address checked would not be the one reached.

Keys (config file or SHEDSHARE_AGENT_<KEY>, lists as JSON lists or comma-separated):
- `scratch_max_mb`: the most a job's inputs may hold, all together (default 100 GiB).
- `data_private_hosts`: `host` or `host:port` of storage the owner trusts on an internal address
  or over plain HTTP (none by default).
- `data_ca_file`: a PEM file of certificate authorities trusted for HTTPS besides the public
  ones (certifi's), for the owner's own storage under a private CA (none by default).
"""

import errno
import hashlib
import os
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi
import httpcore
import httpx

from nodes.agent import __version__, imageref, images
from nodes.agent.isolation import positive
from nodes.agent.protocol import Staging

CHUNK = 4 * 2**20  # an upload's reads: big enough that hashing and the disk, not Python, set the pace
DETAIL_MAX = 500
TIMEOUT = httpx.Timeout(60.0, connect=10.0)  # per connect and per read or write, not per file


class StagingError(Exception):
    """Why one item could not be staged: a `Staging` reason and words naming its path, never its URL."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Staged:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DataPolicy:
    scratch_max_mb: int = 102400
    data_private_hosts: tuple[str, ...] = ()
    data_ca_file: str = ""
    # How an endpoint's name is looked up: injected so that tests need no DNS.
    resolve: Callable[[str], list[str]] = field(default=images.resolve, compare=False, repr=False)


def _hosts(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else [str(item) for item in value]
    return tuple(item.strip().lower() for item in items if item.strip())


KEYS = tuple(f.name for f in fields(DataPolicy) if f.name != "resolve")


def _ca_file(value: Any) -> str:
    path = str(value).strip()
    if path:
        try:
            ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{path}: not a PEM file of certificates ({exc})") from None
    return path


PARSERS: dict[str, Callable[[Any], Any]] = {
    "scratch_max_mb": positive(int),
    "data_private_hosts": _hosts,
    "data_ca_file": _ca_file,
}


# httpcore reads a response 64 KiB per receive, which holds a gigabyte's fetch to a fraction of
# what the disk and the hash take; its connections read this much instead (a larger read returns
# whatever has arrived, so small answers are unchanged).
READ_BYTES = 2**20


def _read_larger() -> None:
    connection = getattr(getattr(httpcore, "_sync", None), "http11", None)
    connection = getattr(connection, "HTTP11Connection", None)
    if connection is not None and getattr(connection, "READ_NUM_BYTES", READ_BYTES) < READ_BYTES:
        connection.READ_NUM_BYTES = READ_BYTES


def new_client(ca_file: str = "") -> httpx.Client:
    """The data path's HTTP client; `ca_file` adds certificate authorities to the public ones."""
    _read_larger()
    # identity: a file is the bytes the storage holds, not a transfer encoding of them.
    headers = {"User-Agent": f"shedshare-agent/{__version__}", "Accept-Encoding": "identity"}
    verify = ssl.create_default_context(cafile=certifi.where())
    if ca_file:
        verify.load_verify_locations(cafile=ca_file)
    return httpx.Client(timeout=TIMEOUT, headers=headers, trust_env=False, follow_redirects=False, verify=verify)


def parts(path: str) -> list[str]:
    """The components of an item's path, which must stay inside its folder (the server checked
    it too): relative, without '.', '..' or empty components."""
    names = path.split("/") if isinstance(path, str) else []
    if not names or "\0" in path or any(name in ("", ".", "..") for name in names):
        raise StagingError(Staging.BAD_PATH, f"{path!r}: not a relative path inside its folder")
    return names


def fetch(
    item: dict[str, Any],
    scratch: Path,
    *,
    client: httpx.Client,
    limit_bytes: int,
    allow: set[str] | frozenset[str] = frozenset(),
    resolve: Callable[[str], list[str]] = images.resolve,
) -> Staged:
    """GET the input into ``scratch/inputs/<path>``, checking its declared size and SHA-256, and
    refusing more than `limit_bytes`. A file not fetched whole is removed."""
    path = item["path"]
    target = scratch.joinpath("inputs", *parts(path))
    _check_endpoint(path, item["url"], allow, resolve)
    declared_size, declared_sha = item.get("size"), item.get("sha256")
    limit = limit_bytes if declared_size is None else min(limit_bytes, declared_size)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with client.stream("GET", item["url"], follow_redirects=False) as response:
            _check_answer(path, item["url"], response)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                with open(fd, "wb") as out:
                    # The pieces as they arrive (up to READ_BYTES): re-cutting them to a fixed size
                    # costs a copy of every byte, which held a fetch to half its pace.
                    staged = _save(path, response.iter_raw(), out, limit, limit_bytes)
            except BaseException:
                target.unlink(missing_ok=True)
                raise
    except httpx.HTTPError as exc:
        raise _unreachable(path, item["url"], exc) from None
    except OSError as exc:
        reason = Staging.SCRATCH_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else Staging.BAD_PATH
        raise StagingError(reason, f"{path}: cannot write it to scratch: {exc.strerror}") from None
    if declared_size is not None and staged.size != declared_size:
        target.unlink(missing_ok=True)
        raise StagingError(Staging.SIZE, f"{path}: {staged.size} bytes, declared {declared_size}")
    if declared_sha is not None and staged.sha256 != declared_sha.lower():
        target.unlink(missing_ok=True)
        raise StagingError(Staging.CHECKSUM, f"{path}: SHA-256 {staged.sha256}, declared {declared_sha}")
    return staged


def _save(path: str, chunks: Iterator[bytes], out: Any, limit: int, limit_bytes: int) -> Staged:
    """Write and hash the chunks, stopping past `limit`: the declared size, or the scratch left."""
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            if size > limit_bytes:
                raise StagingError(Staging.SCRATCH_FULL, f"{path}: over the {limit_bytes} bytes of scratch left")
            raise StagingError(Staging.SIZE, f"{path}: more bytes than the {limit} declared")
        digest.update(chunk)
        out.write(chunk)
    return Staged(path, size, digest.hexdigest())


def upload(
    item: dict[str, Any],
    scratch: Path,
    *,
    client: httpx.Client,
    allow: set[str] | frozenset[str] = frozenset(),
    resolve: Callable[[str], list[str]] = images.resolve,
) -> Staged:
    """PUT ``scratch/outputs/<path>``, a regular file reached through no symbolic link, streamed
    with its Content-Length (as presigned S3 URLs want). The job wrote the folder, so it is
    walked one component at a time without following links, and the file is read from the
    descriptor that was checked."""
    path = item["path"]
    names = parts(path)
    _check_endpoint(path, item["url"], allow, resolve)
    fd = _open_output(scratch / "outputs", names, path)
    with open(fd, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        digest = hashlib.sha256()
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        try:
            response = client.put(item["url"], content=_read(source, size, digest), headers=headers)
        except httpx.HTTPError as exc:
            raise _unreachable(path, item["url"], exc) from None
        except OSError as exc:
            raise StagingError(Staging.BAD_PATH, f"{path}: cannot read it: {exc.strerror}") from None
    _check_answer(path, item["url"], response)
    return Staged(path, size, digest.hexdigest())


def _read(source: Any, size: int, digest: Any) -> Iterator[bytes]:
    """Exactly `size` bytes, hashed as they go: what a process the job left behind appends
    meanwhile is not sent, and what is sent is what the hash says."""
    left = size
    while left:
        chunk = source.read(min(CHUNK, left))
        if not chunk:
            raise OSError(errno.EIO, "the file shrank while it was read")
        digest.update(chunk)
        left -= len(chunk)
        yield chunk


def _open_output(outputs: Path, names: list[str], path: str) -> int:
    """A descriptor of the regular file at outputs/<names>, never through a link."""
    try:
        folder = os.open(outputs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        raise StagingError(Staging.BAD_PATH, f"{path}: outputs/ is not a folder") from None
    try:
        for name in names[:-1]:
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
            os.close(folder)
            folder = inner
        # Non-blocking: opening a FIFO the job left would otherwise wait for a writer.
        fd = os.open(names[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
    except FileNotFoundError:
        raise StagingError(Staging.MISSING, f"{path}: the job wrote no such file in outputs/") from None
    except OSError:
        raise StagingError(Staging.BAD_PATH, f"{path}: reached through a link, or not a file") from None
    finally:
        os.close(folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StagingError(Staging.BAD_PATH, f"{path}: not a regular file")
    return fd


def _check_endpoint(path: str, url: str, allow: set[str] | frozenset[str], resolve: Callable) -> None:
    try:
        split = urlsplit(url)
        host, port = (split.hostname or "").lower(), split.port
    except ValueError:
        raise StagingError(Staging.UNREACHABLE, f"{path}: not a URL") from None
    trusted = host in allow or f"{host}:{port}" in allow
    if split.scheme not in ("http", "https") or not host:
        raise StagingError(Staging.REFUSED, f"{path}: not an https:// URL")
    if split.scheme == "http" and not trusted:
        raise StagingError(
            Staging.REFUSED, f"{path}: {host} over plain http, which this unit allows only to its own hosts"
        )
    if trusted:
        return
    if imageref.internal_host(host):
        raise StagingError(Staging.REFUSED, f"{path}: {host} is a loopback, private or local address")
    addresses = [imageref.literal_address(a.split("%")[0]) for a in resolve(host)]
    if not addresses:
        raise StagingError(Staging.UNREACHABLE, f"{path}: {host} does not resolve here")
    if any(a is None or imageref.internal_address(a) for a in addresses):
        raise StagingError(Staging.REFUSED, f"{path}: {host} resolves to a private or local address here")


def _check_answer(path: str, url: str, response: httpx.Response) -> None:
    status, host = response.status_code, _host(url)
    if response.is_success:
        return
    if response.is_redirect:
        raise StagingError(Staging.UNREACHABLE, f"{path}: {host} redirected elsewhere ({status}), not followed")
    if status == 404:
        raise StagingError(Staging.MISSING, f"{path}: {host} answered 404")
    if status in (401, 403):
        raise StagingError(Staging.EXPIRED, f"{path}: {host} refused the URL ({status}); expired?")
    raise StagingError(Staging.UNREACHABLE, f"{path}: {host} answered {status}")


def _unreachable(path: str, url: str, exc: httpx.HTTPError) -> StagingError:
    """Why the storage could not be reached, in words naming its host, never the URL."""
    host = _host(url)
    if isinstance(exc, httpx.TimeoutException):
        return StagingError(Staging.UNREACHABLE, f"{path}: {host} timed out")
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        why = "its TLS certificate is not one this unit trusts (an owner's private CA goes in data_ca_file)"
        return StagingError(Staging.UNREACHABLE, f"{path}: {host}: {why}")
    return StagingError(Staging.UNREACHABLE, f"{path}: {host}: {type(exc).__name__}")


def _host(url: str) -> str:
    # Only the host: a URL's query holds the signature that opens the data.
    return urlsplit(url).netloc.rpartition("@")[2]


def stage_in(
    items: list[dict[str, Any]], scratch: Path, policy: DataPolicy, *, clock: Callable[[], float] = time.monotonic
) -> dict[str, Any]:
    """Fetch the inputs in order, stopping at the first that fails; the phase's report."""
    began, staged, failure = clock(), [], None
    left = policy.scratch_max_mb * 2**20
    allow = frozenset(policy.data_private_hosts)
    with new_client(policy.data_ca_file) as client:
        for item in items:
            try:
                done = fetch(item, scratch, client=client, limit_bytes=left, allow=allow, resolve=policy.resolve)
            except StagingError as exc:
                failure = exc
                break
            staged.append(done)
            left -= done.size
    return report("in", staged, failure, clock() - began)


def stage_out(
    items: list[dict[str, Any]], scratch: Path, policy: DataPolicy, *, clock: Callable[[], float] = time.monotonic
) -> dict[str, Any]:
    """Upload every output, past a failure too (as much of the job's work as can be saved
    is); the phase's report names the first failure."""
    began, staged, failures = clock(), [], []
    allow = frozenset(policy.data_private_hosts)
    with new_client(policy.data_ca_file) as client:
        for item in items:
            try:
                staged.append(upload(item, scratch, client=client, allow=allow, resolve=policy.resolve))
            except StagingError as exc:
                failures.append(exc)
    return report("out", staged, failures[0] if failures else None, clock() - began, failed=len(failures))


def report(
    phase: str, staged: list[Staged], failure: StagingError | None, seconds: float, failed: int = 0
) -> dict[str, Any]:
    """The body of POST allocations/<id>/staging."""
    detail = "" if failure is None else failure.detail
    if failed > 1:
        detail += f" (and {failed - 1} more failed)"
    return {
        "phase": phase,
        "ok": failure is None,
        "reason": "" if failure is None else failure.reason,
        "detail": detail[:DETAIL_MAX],
        "files": [{"path": s.path, "size": s.size, "sha256": s.sha256} for s in staged],
        "seconds": max(0.0, seconds),
    }
