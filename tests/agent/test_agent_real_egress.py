"""A job allowed egress reaches the internet and nothing of the owner's, on a real engine.

Every address a probe targets is a listener this test started, in network namespaces it made:
a stand-in public server on a documentation range (198.51.100.0/24, never routed on the
internet), stand-ins for hosts on each private range, for carrier-grade NAT and for the cloud
metadata address, a service of the host bound to 0.0.0.0, and a second job on the bridge. Before
probing, the host reaches each stand-in, so a "blocked" is the agent's rules and not a dead
listener. Needs root (`ip netns`), like the agent's rules themselves.
"""

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nodes.agent.runtime import JobSpec
from nodes.agent.runtime.docker import DockerRuntime, egress_guard
from tests.agent import engine as real
from tests.agent.isolation_table import Table

PORT = 80


@dataclass(frozen=True)
class StandIn:
    name: str
    row: str
    subnet: str  # the host side is .1, the stand-in .2 (or `address`)
    address: str = ""

    @property
    def target(self) -> str:
        return self.address or str(ipaddress.ip_network(self.subnet)[2])

    @property
    def host_side(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[1])


STAND_INS = (
    StandIn("public", "a public server", "198.51.100.0/24"),
    StandIn("lan10", "a LAN host in 10.0.0.0/8", "10.213.77.0/24"),
    StandIn("lan172", "a LAN host in 172.16.0.0/12", "172.31.213.0/24"),
    StandIn("lan192", "a LAN host in 192.168.0.0/16", "192.168.213.0/24"),
    StandIn("cgnat", "a host in 100.64.0.0/10 (CGNAT)", "100.64.213.0/24"),
    StandIn("meta", "the metadata address 169.254.169.254", "169.254.169.0/24", "169.254.169.254"),
)

table = Table(
    "egress",
    {
        "a public server": "reachable",
        **{s.row: "blocked" for s in STAND_INS[1:]},
        "a host service, through the bridge's gateway": "blocked",
        "a host service, at another of the host's addresses": "blocked",
        "another job on the egress bridge": "blocked",
        "a job without egress": "no network at all",
    },
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)  # noqa: S603, S607


def http_server(directory: str, address: str, port: int, netns: str = "") -> subprocess.Popen:
    command = ["busybox", "httpd", "-f", "-p", f"{address}:{port}", "-h", directory]
    return subprocess.Popen(["ip", "netns", "exec", netns, *command] if netns else command)  # noqa: S603, S607


def answers(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=2):
        return True
    return False


def wait_answers(address: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while not answers(address, port):
        assert time.monotonic() < deadline, f"the stand-in at {address}:{port} did not come up"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The stand-ins, up and answering the host; yields probe name -> address:port."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("busybox"):
        real.unavailable("needs root, iproute2 and busybox to make the stand-in hosts")
    www = tmp_path_factory.mktemp("www")
    (www / "index.html").write_text("stand-in\n")
    www.chmod(0o755)
    made, servers = [], []
    try:
        for stand_in in STAND_INS:
            routed = subprocess.run(
                ["ip", "-4", "route", "show", "to", "match", stand_in.target],
                capture_output=True,  # noqa: S603, S607
                text=True,
                check=True,
            ).stdout
            assert not any(line.split()[0] not in ("default",) for line in routed.splitlines()), (
                f"{stand_in.subnet} is already in use on this machine: {routed}"
            )
            ns, host_if = f"shs-test-{stand_in.name}", f"shst-{stand_in.name}"
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            prefix = ipaddress.ip_network(stand_in.subnet).prefixlen
            ip("addr", "add", f"{stand_in.host_side}/{prefix}", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("-n", ns, "addr", "add", f"{stand_in.target}/{prefix}", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            servers.append(http_server(str(www), stand_in.target, PORT, ns))
        host_port = free_port()
        servers.append(http_server(str(www), "0.0.0.0", host_port))  # noqa: S104 - a host service on every address
        targets = {s.name: f"{s.target}:{PORT}" for s in STAND_INS}
        targets["host_other"] = f"{STAND_INS[0].host_side}:{host_port}"
        for target in targets.values():
            address, port = target.rsplit(":", 1)
            wait_answers(address, int(port))
        yield targets | {"host_port": str(host_port)}
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)  # noqa: S603, S607 - its veth goes with it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def engine():
    client = real.client()
    yield client
    table.write()


@pytest.fixture(params=real.RUNTIMES)
def runtime_name(request, engine):
    real.require_runtime(engine, request.param)
    return request.param


@pytest.fixture
def runtime(engine, runtime_name, tmp_path) -> DockerRuntime:
    cfg = real.config(runtime_name)
    return real.runtime(engine, cfg, tmp_path, egress=egress_guard(engine, cfg))


def spec(name: str, script: str, egress: bool) -> JobSpec:
    allocation = f"egress-{name}-{os.getpid()}-{time.monotonic_ns()}"
    return JobSpec(
        allocation, f"job-{name}", real.image(), ("sh", "-c", script), ("GPU-simulated",), network_egress=egress
    )


def probe_script(targets: dict[str, str]) -> str:
    """An HTTP GET to each target with busybox's nc (its static wget crashes resolving names
    without glibc's modules in the image); "yes" only when the stand-in itself answered."""
    request = r"printf 'GET / HTTP/1.0\r\n\r\n'"
    lines = [
        f"if {request} | nc -w 3 {target.replace(':', ' ')} 2>/dev/null | grep -q stand-in; "
        f"then echo reach_{name}=yes; else echo reach_{name}=no; fi"
        for name, target in targets.items()
    ]
    return "\n".join(lines)


def test_a_job_with_egress_reaches_the_public_stand_in_and_nothing_of_the_owners(runtime, runtime_name, network):
    neighbour = real.start(
        runtime, spec("neighbour", f"echo stand-in > index.html; busybox httpd -f -p {PORT + 8000}", True)
    )
    try:
        real.wait_running(neighbour, runtime)
        settings = neighbour.container.attrs["NetworkSettings"]["Networks"]["shedshare-egress"]
        neighbour_address, gateway = settings["IPAddress"], settings["Gateway"]
        wait_answers(neighbour_address, PORT + 8000)  # the host reaches it
        targets = {s.name: f"{s.target}:{PORT}" for s in STAND_INS}
        targets |= {
            "gateway": f"{gateway}:{network['host_port']}",
            "host_other": network["host_other"],
            "neighbour": f"{neighbour_address}:{PORT + 8000}",
        }
        handle = real.start(runtime, spec("prober", probe_script(targets), True))
        try:
            code = real.wait_exit(runtime, handle)
        finally:
            runtime.cleanup(handle)
    finally:
        runtime.kill(neighbour)
        real.wait_exit(runtime, neighbour)
        runtime.cleanup(neighbour)

    output = handle.log_path.read_text()
    assert code == 0, output
    seen = real.values(output)
    observe = table.observer(runtime_name)
    rows = {s.name: s.row for s in STAND_INS} | {
        "gateway": "a host service, through the bridge's gateway",
        "host_other": "a host service, at another of the host's addresses",
        "neighbour": "another job on the egress bridge",
    }
    reached = {name: seen[f"reach_{name}"] for name in targets}
    for name, row in rows.items():
        observe(row, "reachable" if reached[name] == "yes" else "blocked")
    assert reached == {name: "yes" if name == "public" else "no" for name in targets}, output


def test_a_job_without_egress_reaches_nothing(runtime, runtime_name, network):
    handle = real.start(
        runtime,
        spec("closed", probe_script({"public": f"{STAND_INS[0].target}:{PORT}"}) + "\nls /sys/class/net", False),
    )
    try:
        code = real.wait_exit(runtime, handle)
    finally:
        runtime.cleanup(handle)

    output = handle.log_path.read_text()
    assert code == 0, output
    assert real.values(output)["reach_public"] == "no"
    assert output.split()[-1] == "lo"
    table.observer(runtime_name)("a job without egress", "loopback only; the public stand-in unreachable")
