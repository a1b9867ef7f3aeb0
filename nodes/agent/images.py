"""The owner's image policy: which registries jobs' images may come from, how large they may be,
and how long the agent keeps the images it pulled.

Keys (config file or SHEDSHARE_AGENT_<KEY>, lists as JSON lists or comma-separated):
- `registries`: registry hosts jobs may pull from, `host`, `host:port` or `*.domain`; the default
  is the public list below. A host without a port matches it on any port.
- `registry_mirrors`: `host[:port]` of the owner's own mirrors, the only registries allowed on
  loopback, private, link-local or other internal addresses (nothing by default).
- `image_max_mb`: the largest image a job may use, unpacked (default 32 GiB).
- `image_keep_hours`: an image the agent pulled is removed once no container uses it and no job
  has started from it for this long (default 24).
- `image_disk_mb`: the most disk the agent's pulled images may hold; beyond it the least recently
  used unused images go first (default 200 GiB).

Why the address rule: the Docker engine pulls with the owner's network position, so an image
named after a registry on the owner's LAN or loopback would make it connect there for a renter.
The agent looks the registry's name up before it accepts a job and refuses a name that resolves
to an internal address; the engine looks it up again when it pulls, so the allow-list of hosts
the owner trusts, not the lookup, is what keeps a hostile name out.
"""

import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from nodes.agent import imageref
from nodes.agent.isolation import positive

DEFAULT_REGISTRIES = (
    "docker.io",
    "ghcr.io",
    "quay.io",
    "nvcr.io",
    "registry.k8s.io",
    "public.ecr.aws",
    "gcr.io",
    "*.gcr.io",
    "*.pkg.dev",
    "mcr.microsoft.com",
    "registry.gitlab.com",
)
DOCKER_HUB = ("docker.io", "index.docker.io")
RULE_REFERENCE, RULE_REGISTRIES, RULE_INTERNAL, RULE_SIZE = (
    "image_reference",
    "registries",
    "internal_registry",
    "image_max_mb",
)


def resolve(host: str) -> list[str]:
    """Every address the host's name resolves to here; [] when it does not resolve."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
    except (OSError, UnicodeError):
        return []


@dataclass(frozen=True)
class ImagePolicy:
    registries: tuple[str, ...] = DEFAULT_REGISTRIES
    registry_mirrors: tuple[str, ...] = ()
    image_max_mb: int = 32768
    image_keep_hours: float = 24.0
    image_disk_mb: int = 204800
    # How a registry's name is looked up: injected so that tests need no DNS.
    resolve: Callable[[str], list[str]] = field(default=resolve, compare=False, repr=False)


KEYS = tuple(f.name for f in fields(ImagePolicy) if f.name != "resolve")


def registry_problem(image: str, policy: ImagePolicy) -> str | None:
    """Which of the owner's rules the image breaks, in words the renter may read, or None.

    Says what the rule is and what in the reference broke it, never what a lookup answered."""
    try:
        ref = imageref.parse(image)
    except imageref.BadReference as exc:
        return f"rule {RULE_REFERENCE}: {exc}"
    if ref.registry in policy.registry_mirrors:
        return None  # the owner's explicit choice, internal or not
    if imageref.internal_host(ref.host):
        return f"rule {RULE_INTERNAL}: {ref.registry} is a loopback, private or local address; this unit allows none"
    if not any(_matches(pattern, ref) for pattern in policy.registries):
        return f"rule {RULE_REGISTRIES}: {ref.registry} is not one of the registries this unit pulls from"
    addresses = [imageref.literal_address(a.split("%")[0]) for a in policy.resolve(ref.host)]
    if not addresses:
        return f"rule {RULE_INTERNAL}: {ref.registry} does not resolve to a public address here"
    if any(a is None or imageref.internal_address(a) for a in addresses):
        return f"rule {RULE_INTERNAL}: {ref.registry} resolves to a private or local address here"
    return None


def size_problem(size_bytes: int, policy: ImagePolicy) -> str | None:
    mb = -(-size_bytes // 2**20)
    if mb <= policy.image_max_mb:
        return None
    return f"rule {RULE_SIZE}: the image is {mb} MiB, over this unit's cap of {policy.image_max_mb} MiB"


def _matches(pattern: str, ref: imageref.ImageRef) -> bool:
    wildcard, (host, port) = pattern.startswith("*."), _split(pattern.removeprefix("*."))
    if port is not None and ref.port != port:
        return False
    return ref.host.endswith(f".{host}") if wildcard else ref.host == host


def _split(registry: str) -> tuple[str, int | None]:
    ref = imageref.parse(f"{registry}/probe")
    return ref.host, ref.port


def _hosts(value: Any) -> tuple[str, ...]:
    """Registry hosts as `ImageRef.registry` spells them, so that they compare with references."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    hosts = []
    for item in filter(None, items):
        wildcard, name = item.startswith("*."), item.removeprefix("*.")
        try:
            ref = imageref.parse(f"{name}/probe")
        except imageref.BadReference:
            ref = None
        if ref is None or (ref.host == imageref.DEFAULT_REGISTRY and name.lower() not in DOCKER_HUB):
            raise ValueError(f"{item!r} is not a registry host such as ghcr.io or mirror.lan:5000")
        hosts.append(("*." if wildcard else "") + ref.registry)
    return tuple(hosts)


PARSERS: dict[str, Callable[[Any], Any]] = {
    "registries": _hosts,
    "registry_mirrors": _hosts,
    "image_max_mb": positive(int),
    "image_keep_hours": positive(float),
    "image_disk_mb": positive(int),
}
