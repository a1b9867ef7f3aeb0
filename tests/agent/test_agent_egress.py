"""The egress rules, installed into an in-memory iptables and checked by sending packets through it."""

import ipaddress
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from nodes.agent.egress import DEFAULT_BRIDGE, EgressGuard, EgressUnavailable, bridge_of, network_options
from tests.agent.docker_fakes import FakeNetwork

BRIDGE = DEFAULT_BRIDGE
FOREIGN_ACCEPT = ("-j", "ACCEPT")  # what an owner's firewall script or another tool might insert
REJECT_ADMIN = ("-j", "REJECT", "--reject-with", "icmp-admin-prohibited")
VERDICTS = ("ACCEPT", "DROP", "REJECT")


@dataclass(frozen=True)
class Packet:
    dst: str
    into: str = BRIDGE  # the interface it arrives on
    out: str = "eth0"  # the interface it leaves by, when forwarded
    state: str = "NEW"  # as conntrack sees it


class FakeIptables:
    """iptables and ip6tables as the `run` callable: one filter table each, rules kept as the
    words `iptables -S` prints after the chain's name. `missing` tools answer like an absent
    binary does through `run_command`."""

    def __init__(self, *, docker: bool = True, missing: Sequence[str] = ()) -> None:
        self.missing = set(missing)
        self.tables: dict[str, dict[str, list[tuple[str, ...]]]] = {
            tool: {"INPUT": [("-i", "lo", "-j", "ACCEPT")], "FORWARD": [], "OUTPUT": []}
            for tool in ("iptables", "ip6tables")
        }
        if docker:
            # The engine's chains: FORWARD sends everything to DOCKER-USER first, then accepts its bridges'.
            self.tables["iptables"]["DOCKER-USER"] = [("-j", "RETURN")]
            self.tables["iptables"]["FORWARD"] = [("-j", "DOCKER-USER"), ("-o", "docker0", "-j", "ACCEPT")]
        else:
            self.tables["iptables"]["FORWARD"] = [("-i", "eth1", "-j", "ACCEPT")]

    def __call__(self, argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
        tool, *args = argv
        if tool in self.missing:
            return subprocess.CompletedProcess(list(argv), 127, "", f"{tool}: not installed")
        if tool == "modprobe":
            return subprocess.CompletedProcess(list(argv), 0, "", "")
        if args[:1] == ["-w"]:
            args = args[1:]
        rc, out = self._apply(self.tables[tool], args)
        return subprocess.CompletedProcess(list(argv), rc, out, "" if rc == 0 else f"{tool}: failed")

    def rules(self, tool: str, chain: str) -> list[tuple[str, ...]]:
        return self.tables[tool][chain]

    def verdict(self, tool: str, chain: str, packet: Packet) -> str:
        """What the chain decides, built-in chains' policy being ACCEPT."""
        result = self._walk(self.tables[tool], chain, packet)
        return "ACCEPT" if result == "RETURN" else result

    def _apply(self, table: dict[str, list[tuple[str, ...]]], args: list[str]) -> tuple[int, str]:
        if args[:2] == ["-n", "-L"]:
            return (0, "") if args[2] in table else (1, "")
        command, chain, *spec = args
        if command == "-N":
            if chain in table:
                return 1, ""
            table[chain] = []
            return 0, ""
        if chain not in table:
            return 1, ""
        rules = table[chain]
        if command == "-F":
            rules.clear()
        elif command == "-A":
            rules.append(tuple(spec))
        elif command == "-I":
            rules.insert(int(spec[0]) - 1, tuple(spec[1:]))
        elif command in ("-D", "-C"):
            if tuple(spec) not in rules:
                return 1, ""
            if command == "-D":
                rules.remove(tuple(spec))
        elif command == "-S":
            index = int(spec[0]) - 1
            if index >= len(rules):
                return 1, ""
            return 0, " ".join(["-A", chain, *rules[index]]) + "\n"
        else:
            raise AssertionError(f"the fake does not know {command}")
        return 0, ""

    def _walk(self, table: dict[str, list[tuple[str, ...]]], chain: str, packet: Packet) -> str:
        for rule in table[chain]:
            target = _target_if_matches(rule, packet)
            if target is None:
                continue
            if target in (*VERDICTS, "RETURN"):
                return target
            result = self._walk(table, target, packet)
            if result in VERDICTS:
                return result
        return "RETURN"


def _target_if_matches(rule: tuple[str, ...], packet: Packet) -> str | None:
    options = dict(zip(rule[::2], rule[1::2], strict=True))
    tests = {
        "-i": lambda value: packet.into == value,
        "-o": lambda value: packet.out == value,
        "-d": lambda value: ipaddress.ip_address(packet.dst) in ipaddress.ip_network(value),
        "--ctstate": lambda value: packet.state in value.split(","),
    }
    ignored = ("-j", "-m", "--reject-with")
    assert set(options) <= {*tests, *ignored}, f"the fake cannot match {rule}"
    if all(test(options[option]) for option, test in tests.items() if option in options):
        return options["-j"]
    return None


@pytest.fixture
def iptables():
    return FakeIptables()


@pytest.fixture
def bridge_nf(tmp_path):
    path = tmp_path / "bridge-nf-call-iptables"
    path.write_text("0\n")
    return path


@pytest.fixture
def net(tmp_path):
    (tmp_path / "net" / BRIDGE).mkdir(parents=True)
    return tmp_path / "net"


def guard_for(iptables: FakeIptables, bridge_nf, net) -> EgressGuard:
    return EgressGuard(BRIDGE, run=iptables, bridge_nf=bridge_nf, net=net)


@pytest.fixture
def guard(iptables, bridge_nf, net):
    return guard_for(iptables, bridge_nf, net)


def first(iptables: FakeIptables, tool: str, chain: str) -> tuple[str, ...]:
    return iptables.rules(tool, chain)[0]


@pytest.mark.parametrize(("docker", "forward_parent"), [(True, "DOCKER-USER"), (False, "FORWARD")])
def test_installed_rules_leave_no_problem_and_each_jump_comes_first(bridge_nf, net, docker, forward_parent):
    iptables = FakeIptables(docker=docker)
    guard = guard_for(iptables, bridge_nf, net)

    guard.install()

    assert guard.problems() == []
    assert first(iptables, "iptables", "INPUT") == ("-i", BRIDGE, "-j", "SHEDSHARE-EGRESS-IN")
    assert first(iptables, "iptables", forward_parent) == ("-i", BRIDGE, "-j", "SHEDSHARE-EGRESS")
    assert first(iptables, "ip6tables", "INPUT") == ("-i", BRIDGE, "-j", "SHEDSHARE-EGRESS-IN")
    assert first(iptables, "ip6tables", "FORWARD") == ("-i", BRIDGE, "-j", "SHEDSHARE-EGRESS")


def test_nothing_is_in_place_before_install(guard):
    assert len(guard.problems()) > 1


@pytest.mark.parametrize(
    "address",
    [
        "0.0.0.1",  # "this network"
        "10.0.0.1",
        "10.255.255.254",
        "100.64.0.1",
        "100.127.255.254",  # carrier-grade NAT
        "127.0.0.1",
        "169.254.169.254",  # cloud metadata
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "224.0.0.251",  # mDNS
        "239.255.255.250",  # SSDP
        "240.0.0.1",
        "255.255.255.255",
    ],
)
def test_a_job_reaches_no_private_loopback_link_local_multicast_or_reserved_address(iptables, guard, address):
    guard.install()

    assert iptables.verdict("iptables", "FORWARD", Packet(address)) == "REJECT"


@pytest.mark.parametrize("address", ["1.1.1.1", "8.8.8.8", "11.0.0.1", "100.128.0.1", "172.32.0.1", "192.169.0.1"])
def test_a_job_reaches_a_public_address(iptables, guard, address):
    guard.install()

    assert iptables.verdict("iptables", "FORWARD", Packet(address)) == "ACCEPT"


def test_other_containers_traffic_is_none_of_the_guards_business(iptables, guard):
    guard.install()

    assert iptables.verdict("iptables", "FORWARD", Packet("10.0.0.1", into="docker0")) == "ACCEPT"


def test_a_job_cannot_reach_another_job_on_the_bridge(iptables, guard):
    guard.install()

    # A public address, so that only the rule about the bridge itself can refuse it.
    assert iptables.verdict("iptables", "FORWARD", Packet("198.51.100.7", out=BRIDGE)) == "REJECT"


@pytest.mark.parametrize("address", ["172.18.0.1", "192.0.2.10"])  # the bridge's gateway; a public address of the host
def test_a_job_reaches_no_service_of_the_host_but_answers_the_agent(iptables, guard, address):
    guard.install()

    assert iptables.verdict("iptables", "INPUT", Packet(address)) == "REJECT"
    assert iptables.verdict("iptables", "INPUT", Packet(address, state="ESTABLISHED")) == "ACCEPT"
    assert iptables.verdict("iptables", "INPUT", Packet(address, into="eth0")) == "ACCEPT"


@pytest.mark.parametrize("address", ["2606:4700:4700::1111", "fe80::1", "fd00::1", "::1"])
def test_ip6tables_refuses_everything_from_the_bridge(iptables, guard, address):
    guard.install()

    assert iptables.verdict("ip6tables", "FORWARD", Packet(address)) == "REJECT"
    assert iptables.verdict("ip6tables", "INPUT", Packet(address)) == "REJECT"


def delete_metadata_rule(iptables: FakeIptables) -> None:
    iptables.rules("iptables", "SHEDSHARE-EGRESS").remove(("-d", "169.254.0.0/16", *REJECT_ADMIN))


def accept_above_our_jump(iptables: FakeIptables) -> None:
    iptables.rules("iptables", "DOCKER-USER").insert(0, FOREIGN_ACCEPT)


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (delete_metadata_rule, "iptables: missing in SHEDSHARE-EGRESS: -d 169.254.0.0/16"),
        (accept_above_our_jump, f"iptables: DOCKER-USER does not send {BRIDGE} to SHEDSHARE-EGRESS first"),
    ],
)
def test_a_rule_removed_or_overtaken_is_a_problem_that_ensure_repairs(iptables, guard, tamper, problem):
    metadata = Packet("169.254.169.254")
    guard.install()
    tamper(iptables)

    assert iptables.verdict("iptables", "FORWARD", metadata) == "ACCEPT"
    assert [found for found in guard.problems() if found.startswith(problem)]

    guard.ensure()

    assert guard.problems() == []
    assert iptables.verdict("iptables", "FORWARD", metadata) == "REJECT"
    assert first(iptables, "iptables", "DOCKER-USER") == ("-i", BRIDGE, "-j", "SHEDSHARE-EGRESS")


def test_installing_twice_adds_no_rule_twice(iptables, guard):
    guard.install()
    once = {tool: {chain: list(rules) for chain, rules in table.items()} for tool, table in iptables.tables.items()}

    guard.install()

    assert iptables.tables == once
    assert iptables.rules("iptables", "INPUT").count(("-i", BRIDGE, "-j", "SHEDSHARE-EGRESS-IN")) == 1


def test_without_iptables_ensure_says_so(bridge_nf, net):
    guard = guard_for(FakeIptables(missing=["iptables"]), bridge_nf, net)

    with pytest.raises(EgressUnavailable) as raised:
        guard.ensure()

    assert str(raised.value).startswith("iptables -F SHEDSHARE-EGRESS: iptables: not installed; ")
    assert "iptables: missing in SHEDSHARE-EGRESS: -d 169.254.0.0/16" in str(raised.value)


def test_unfiltered_bridge_traffic_is_a_problem_that_install_fixes(iptables, guard, bridge_nf):
    problem = f"{bridge_nf} is not 1: traffic between jobs on the bridge is not filtered"
    assert problem in guard.problems()

    guard.install()

    assert bridge_nf.read_text() == "1\n"
    assert problem not in guard.problems()


def test_a_bridge_not_in_this_network_namespace_is_a_problem(iptables, bridge_nf, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    guard = guard_for(iptables, bridge_nf, tmp_path / "elsewhere")

    guard.install()

    assert guard.problems() == [f"the bridge {BRIDGE} is not in this network namespace (is the agent on the host?)"]


def test_only_a_bridge_network_has_a_bridge():
    with pytest.raises(EgressUnavailable, match="the egress network lab is not a bridge network"):
        bridge_of(FakeNetwork("lab", {}, driver="overlay"))


def test_a_bridge_network_is_named_by_its_option_or_else_by_the_engine():
    named = FakeNetwork("shedshare-egress", {"com.docker.network.bridge.name": "shs-egress0"})
    unnamed = FakeNetwork("other", {})

    assert bridge_of(named) == "shs-egress0"
    assert bridge_of(unnamed) == f"br-{unnamed.attrs['Id'][:12]}"


def test_the_default_egress_network_gets_the_default_bridge_without_ipv6_or_traffic_between_jobs():
    options = network_options("shedshare-egress")

    assert options["name"] == "shedshare-egress" and options["driver"] == "bridge"
    assert options["enable_ipv6"] is False
    assert options["options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert bridge_of(FakeNetwork("shedshare-egress", options["options"])) == "shs-egress0"


def test_another_egress_network_gets_a_stable_bridge_name_linux_accepts():
    name = "a-rather-long-egress-network-name"
    bridge = network_options(name)["options"]["com.docker.network.bridge.name"]

    assert bridge.startswith("shs-") and len(bridge) <= 15  # IFNAMSIZ, less its terminating NUL
    assert network_options(name)["options"]["com.docker.network.bridge.name"] == bridge
    assert network_options("lab-egress")["options"]["com.docker.network.bridge.name"] != bridge
