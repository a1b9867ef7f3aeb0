"""What a job allowed egress may reach: the internet, and nothing of the owner's.

Such jobs join one bridge of the unit's own (`egress_network`). The Docker engine NATs them out
and keeps containers of *other* networks apart, but nothing in it stops a job from reaching the
host (every address it has, through the bridge's gateway), the owner's LAN, a router, a NAS,
carrier-grade NAT or the cloud metadata address. The agent installs these rules itself and checks
them at start-up and before every job that may reach the network; a unit that cannot keep them
takes no such job (and `doctor` fails while `allow_egress` is on).

- IPv4, INPUT: from the bridge, only replies to connections the host opened (the agent reaching a
  job); everything else is rejected: no service of the host, on any of its addresses.
- IPv4, forwarding (in DOCKER-USER, which the engine evaluates before its own rules and never
  rewrites; FORWARD where the engine does not manage iptables): nothing to another container on
  the bridge, nothing to a private, shared, loopback, link-local, multicast or reserved range.
- IPv6: nothing at all from the bridge (the network has no IPv6; this closes link-local too).
- Traffic between two ports of the bridge is filtered only with `bridge-nf-call-iptables`, which
  the agent turns on (br_netfilter) and checks.
"""

import contextlib
import subprocess  # noqa: S404 - runs iptables with fixed arguments, never a shell
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCKED = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local: cloud metadata at 169.254.169.254
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and broadcast
)
CHAIN = "SHEDSHARE-EGRESS"
CHAIN_IN = "SHEDSHARE-EGRESS-IN"
BRIDGE_OPTION = "com.docker.network.bridge.name"
DEFAULT_BRIDGE = "shs-egress0"
BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
NET = Path("/sys/class/net")  # one folder per network interface of this namespace
REJECT = ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]
REJECT6 = ["-j", "REJECT", "--reject-with", "icmp6-adm-prohibited"]

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class EgressUnavailable(Exception):
    """The unit cannot keep jobs allowed egress off the host and private networks."""


def run_command(argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: not installed")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]}: timed out")


@dataclass(frozen=True)
class Rule:
    tool: str  # iptables or ip6tables
    chain: str
    spec: tuple[str, ...]


def plan(bridge: str, forward_parent: str) -> tuple[list[Rule], list[Rule]]:
    """(the rules of our chains, in order; the jumps into them, each first in its parent)."""
    established = ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN")
    rules = [
        Rule("iptables", CHAIN_IN, established),
        Rule("iptables", CHAIN_IN, tuple(REJECT)),
        Rule("iptables", CHAIN, ("-o", bridge, *REJECT)),
        *(Rule("iptables", CHAIN, ("-d", block, *REJECT)) for block in BLOCKED),
        Rule("ip6tables", CHAIN_IN, established),
        Rule("ip6tables", CHAIN_IN, tuple(REJECT6)),
        Rule("ip6tables", CHAIN, tuple(REJECT6)),
    ]
    jumps = [
        Rule("iptables", "INPUT", ("-i", bridge, "-j", CHAIN_IN)),
        Rule("iptables", forward_parent, ("-i", bridge, "-j", CHAIN)),
        Rule("ip6tables", "INPUT", ("-i", bridge, "-j", CHAIN_IN)),
        Rule("ip6tables", "FORWARD", ("-i", bridge, "-j", CHAIN)),
    ]
    return rules, jumps


class EgressGuard:
    """Installs and checks the rules for one bridge."""

    def __init__(self, bridge: str, *, run: Runner = run_command, bridge_nf: Path = BRIDGE_NF, net: Path = NET) -> None:
        self.bridge = bridge
        self._run = run
        self._bridge_nf = bridge_nf
        self._net = net

    def problems(self) -> list[str]:
        """What is missing; empty when every rule is in place, and each jump first in its chain."""
        found = []
        if not (self._net / self.bridge).exists():
            found.append(f"the bridge {self.bridge} is not in this network namespace (is the agent on the host?)")
        rules, jumps = plan(self.bridge, self._forward_parent())
        found += [f"{r.tool}: missing in {r.chain}: {' '.join(r.spec)}" for r in rules if not self._has(r)]
        found += [
            f"{j.tool}: {j.chain} does not send {self.bridge} to {j.spec[-1]} first"
            for j in jumps
            if not self._first(j)
        ]
        if _read(self._bridge_nf) != "1":
            found.append(f"{self._bridge_nf} is not 1: traffic between jobs on the bridge is not filtered")
        return found

    def install(self) -> None:
        self._bridge_filtering()
        rules, jumps = plan(self.bridge, self._forward_parent())
        for tool, chain in sorted({(r.tool, r.chain) for r in rules}):
            self._call(tool, "-N", chain, ok_if_fails=True)  # exists already
            self._call(tool, "-F", chain)
        for rule in rules:
            self._call(rule.tool, "-A", rule.chain, *rule.spec)
        for jump in jumps:
            while self._has(jump):  # anywhere: it goes back in first
                self._call(jump.tool, "-D", jump.chain, *jump.spec)
            self._call(jump.tool, "-I", jump.chain, "1", *jump.spec)

    def ensure(self) -> None:
        """Put the rules back if anything removed them (an engine restart, an owner's script);
        raise EgressUnavailable when they cannot be had."""
        if not self.problems():
            return
        failed = []
        try:
            self.install()
        except EgressUnavailable as exc:  # why, such as iptables not installed; problems() says what
            failed.append(str(exc))
        problems = self.problems()
        if problems:
            raise EgressUnavailable("; ".join(failed + problems))

    def _forward_parent(self) -> str:
        # DOCKER-USER exists where the engine manages iptables; it is evaluated before the
        # engine's own ACCEPT rules, which it inserts above anything placed in FORWARD.
        return "DOCKER-USER" if self._run(["iptables", "-w", "-n", "-L", "DOCKER-USER"]).returncode == 0 else "FORWARD"

    def _has(self, rule: Rule) -> bool:
        return self._run([rule.tool, "-w", "-C", rule.chain, *rule.spec]).returncode == 0

    def _first(self, jump: Rule) -> bool:
        listing = self._run([jump.tool, "-w", "-S", jump.chain, "1"])
        return listing.returncode == 0 and listing.stdout.split() == ["-A", jump.chain, *jump.spec]

    def _call(self, tool: str, *args: str, ok_if_fails: bool = False) -> None:
        done = self._run([tool, "-w", *args])
        if done.returncode != 0 and not ok_if_fails:
            raise EgressUnavailable(f"{tool} {' '.join(args)}: {done.stderr.strip() or done.returncode}")

    def _bridge_filtering(self) -> None:
        if _read(self._bridge_nf) == "1":
            return
        self._run(["modprobe", "br_netfilter"])
        with contextlib.suppress(OSError):  # reported by problems()
            self._bridge_nf.write_text("1\n")


def bridge_of(network: Any) -> str:
    """The Linux bridge behind a Docker bridge network, as the engine names it."""
    attrs = network.attrs
    if attrs.get("Driver") != "bridge":
        raise EgressUnavailable(f"the egress network {attrs.get('Name')} is not a bridge network")
    return str((attrs.get("Options") or {}).get(BRIDGE_OPTION) or f"br-{attrs['Id'][:12]}")


def network_options(name: str) -> dict[str, Any]:
    """`networks.create` arguments for the unit's own egress bridge: no IPv6, no traffic between
    its containers, a bridge name the rules can match."""
    bridge = DEFAULT_BRIDGE if name == "shedshare-egress" else f"shs-{zlib.crc32(name.encode()):08x}"
    return {
        "name": name,
        "driver": "bridge",
        "enable_ipv6": False,
        "options": {"com.docker.network.bridge.enable_icc": "false", BRIDGE_OPTION: bridge},
        "labels": {"shedshare.network": "egress"},
    }


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# A job that serves ports and may not reach out has a network of its own (internal: no route
# anywhere), whose bridge is named JOB_BRIDGE_PREFIX + a hash; but the host answers on the bridge's
# gateway like on any of its addresses. One chain for all of them keeps the host's services off
# every such bridge, leaving the agent its connections to the jobs' ports (the replies).
JOB_BRIDGE_PREFIX = "shs-j"
JOB_CHAIN_IN = "SHEDSHARE-JOBNET-IN"


def job_bridge(allocation_id: str) -> str:
    return f"{JOB_BRIDGE_PREFIX}{zlib.crc32(allocation_id.encode()):08x}"


def job_network_options(name: str, allocation_id: str) -> dict[str, Any]:
    """`networks.create` arguments for a job's own network."""
    return {
        "name": name,
        "driver": "bridge",
        "internal": True,
        "enable_ipv6": False,
        "options": {BRIDGE_OPTION: job_bridge(allocation_id)},
        "labels": {"shedshare.network": "job"},
    }


class JobNetworkGuard:
    """Installs and checks the INPUT rules of the jobs' own bridges (every one, by its prefix)."""

    def __init__(self, *, run: Runner = run_command) -> None:
        self._run = run

    def _plan(self) -> tuple[list[Rule], list[Rule]]:
        wildcard = JOB_BRIDGE_PREFIX + "+"
        established = ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN")
        rules = [
            Rule("iptables", JOB_CHAIN_IN, established),
            Rule("iptables", JOB_CHAIN_IN, tuple(REJECT)),
            Rule("ip6tables", JOB_CHAIN_IN, established),
            Rule("ip6tables", JOB_CHAIN_IN, tuple(REJECT6)),
        ]
        jumps = [Rule(tool, "INPUT", ("-i", wildcard, "-j", JOB_CHAIN_IN)) for tool in ("iptables", "ip6tables")]
        return rules, jumps

    def problems(self) -> list[str]:
        rules, jumps = self._plan()
        found = [f"{r.tool}: missing in {r.chain}: {' '.join(r.spec)}" for r in rules if not self._has(r)]
        for jump in jumps:
            first = self._run([jump.tool, "-w", "-S", "INPUT", "1"]).stdout.split()
            if first != ["-A", "INPUT", *jump.spec]:
                found.append(f"{jump.tool}: INPUT does not send the jobs' bridges to {JOB_CHAIN_IN} first")
        return found

    def ensure(self) -> None:
        """Put the rules in place if any is missing; raise EgressUnavailable when they cannot be."""
        if not self.problems():
            return
        rules, jumps = self._plan()
        for tool in ("iptables", "ip6tables"):
            self._run([tool, "-w", "-N", JOB_CHAIN_IN])  # exists already: fine
            self._call(tool, "-F", JOB_CHAIN_IN)
        for rule in rules:
            self._call(rule.tool, "-A", rule.chain, *rule.spec)
        for jump in jumps:
            while self._has(jump):
                self._call(jump.tool, "-D", jump.chain, *jump.spec)
            self._call(jump.tool, "-I", jump.chain, "1", *jump.spec)
        problems = self.problems()
        if problems:
            raise EgressUnavailable("; ".join(problems))

    def _has(self, rule: Rule) -> bool:
        return self._run([rule.tool, "-w", "-C", rule.chain, *rule.spec]).returncode == 0

    def _call(self, tool: str, *args: str) -> None:
        done = self._run([tool, "-w", *args])
        if done.returncode != 0:
            raise EgressUnavailable(f"{tool} {' '.join(args)}: {done.stderr.strip() or done.returncode}")
