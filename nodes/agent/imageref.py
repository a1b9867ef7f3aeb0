"""Image references and the registry addresses a job must never reach.

Pure Python, shared with the server like `protocol.py`: the server refuses obviously internal
registries when a job is submitted (a fast path), the agent checks every reference again against
its owner's policy before anything is pulled (the guarantee, `images.py`).

A reference is `[registry/]path[:tag][@digest]`, read as Docker reads it: the first component
names a registry only if it has a dot or a colon, is `localhost`, or has upper-case letters
(`ubuntu`, `acme/train` are on docker.io); `registry` is `host[:port]` with an IPv6 host in
brackets.
"""

import ipaddress
import re
import socket
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
MAX_LENGTH = 255
_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = re.compile(rf"(?P<host>{_COMPONENT}(?:\.{_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{{1,5}}))?")
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_REMAINDER = re.compile(
    rf"(?P<path>{_PATH})(?::(?P<tag>[\w][\w.-]{{0,127}}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?"
)
# Names that stand for this machine, its network or a cloud's metadata service wherever they are
# looked up: RFC 6761 localhost, mDNS, the private-use .internal, home.arpa (RFC 8375).
_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".lan")
_INTERNAL_NAMES = ("localhost", "metadata", "instance-data")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BadReference(ValueError):
    pass


@dataclass(frozen=True)
class ImageRef:
    host: str  # lower case; an IPv6 address without its brackets
    port: int | None
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def registry(self) -> str:
        """`host[:port]` as a person writes it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse(reference: str) -> ImageRef:
    """The parts of an image reference; raises BadReference for anything Docker would not pull."""
    if not reference or len(reference) > MAX_LENGTH:
        raise BadReference(f"an image reference has 1 to {MAX_LENGTH} characters")
    first, slash, rest = reference.partition("/")
    names_registry = slash and (any(c in first for c in ".:") or first == "localhost" or first != first.lower())
    registry, remainder = (first, rest) if names_registry else (DEFAULT_REGISTRY, reference)
    found, parts = _REGISTRY.fullmatch(registry), _REMAINDER.fullmatch(remainder)
    if found is None or parts is None:
        raise BadReference(f"{reference!r} is not an image reference such as ghcr.io/acme/train:1.2")
    host, port = found["host"].lower(), int(found["port"]) if found["port"] else None
    if host.startswith("["):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise BadReference(f"{found['host']} is not an IPv6 address") from None
    if port is not None and not 0 < port < 65536:
        raise BadReference(f"{port} is not a port number")
    host = DEFAULT_REGISTRY if host == "index.docker.io" else host
    path = parts["path"]
    if host == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    return ImageRef(host, port, path, parts["tag"], parts["digest"])


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names without any lookup, in every spelling a resolver takes for one:
    `10.0.0.5`, `::1`, and the old inet_aton forms `127.1`, `0x7f000001`, `2130706433`."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def internal_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private (RFC 1918, ULA), shared (CGNAT), link-local (cloud metadata), unspecified,
    multicast, reserved: anything but an ordinary public unicast address, embedded IPv4 included."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and internal_address(embedded):
            return True
    return not address.is_global or address.is_multicast


def internal_name(host: str) -> bool:
    """A name that is this machine or a local network's wherever it is resolved. A name without a
    dot is looked up in the local search domains, so it is never a public registry either."""
    host = host.lower().rstrip(".")
    return host in _INTERNAL_NAMES or host.endswith(_INTERNAL_SUFFIXES) or "." not in host


def internal_host(host: str) -> bool:
    """True when the host is internal on its face: an internal address literal or name."""
    address = literal_address(host)
    return internal_address(address) if address is not None else internal_name(host)
