"""Network namespaces wired as NATs, for the mesh tests that need peers which cannot be
dialled (shared by tests/test_mesh_nat.py and tests/test_mesh_run_relay.py). Nothing is
added to the root namespace (no interface, route, sysctl or firewall rule):

    <tag>-pub      the public peers    10.214.N.2/24, default route via the NAT
    <tag>-gw       the NAT             10.214.N.1 on the public side, 10.X.N.1 on each
                                       site's side; forwards, MASQUERADEs every site out,
                                       drops new connections into any site
    <tag>-<site>   a site behind it    10.X.N.2/24 (X: 213, 215, 216, ...), default route
                                       via the NAT; reached from outside (the public side or
                                       another site) only on connections it opened

Processes run inside with `ip netns exec`. Deleting the namespaces, after their processes
are gone, removes the veth pairs and the NAT's iptables rules with them."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

COMMAND_TIMEOUT = 20.0
SITE_NETS = (213, 215, 216, 217)   # second octet of each site's /24; 214 is the public side


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def check(*args: str) -> None:
    done = sh(*args)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.strip()}"


def why_not() -> str | None:
    """Why this machine cannot build the namespaces, or None when it can (so far)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (package {package}) on the PATH"
    return None


@dataclass(frozen=True)
class Nat:
    """The namespaces' names and the address of the one peer slot in each."""

    pub: str
    gw: str
    sites: dict[str, str]        # site -> its namespace
    public_address: str          # in pub
    addresses: dict[str, str]    # site -> its address


@contextlib.contextmanager
def nat_namespaces(sites: Sequence[str]) -> Iterator[Nat]:
    """A public namespace and one namespace per site behind a shared NAT, wired as the module
    docstring draws them; skips the test (with the reason) where the machine cannot build
    them; deleted on the way out, whatever happened."""
    if (reason := why_not()) is not None:
        pytest.skip(reason)
    assert 0 < len(sites) <= len(SITE_NETS), sites
    tag, subnet = f"isl-nat-{secrets.token_hex(3)}", 1 + secrets.randbelow(254)
    pub, gw = f"{tag}-pub", f"{tag}-gw"
    names = {site: f"{tag}-{site}" for site in sites}
    created: list[str] = []
    try:
        for name in (*names.values(), gw, pub):
            done = sh("ip", "netns", "add", name)
            if done.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {done.stderr.strip()}")
            created.append(name)
        nat = ("ip", "netns", "exec", gw, "iptables")
        if (done := sh(*nat, "-t", "nat", "-L", "-n")).returncode != 0:
            pytest.skip(f"iptables has no nat table here: {done.stderr.strip()}")
        outside = f"10.214.{subnet}"
        # Each veth is created inside its namespaces, never in the root one.
        check("ip", "-n", pub, "link", "add", "pub0", "type", "veth", "peer", "name",
              "gwp", "netns", gw)
        links = [(pub, "pub0", f"{outside}.2"), (gw, "gwp", f"{outside}.1")]
        addresses = {}
        for i, (site, ns) in enumerate(names.items()):
            inside = f"10.{SITE_NETS[i]}.{subnet}"
            check("ip", "-n", ns, "link", "add", "nat0", "type", "veth", "peer", "name",
                  f"gw{i}", "netns", gw)
            links += [(ns, "nat0", f"{inside}.2"), (gw, f"gw{i}", f"{inside}.1")]
            addresses[site] = f"{inside}.2"
        for ns, device, address in links:
            check("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", device)
            check("ip", "-n", ns, "link", "set", device, "up")
        for ns in created:
            check("ip", "-n", ns, "link", "set", "lo", "up")
        check("ip", "-n", pub, "route", "add", "default", "via", f"{outside}.1")
        check("ip", "netns", "exec", gw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for i, (site, ns) in enumerate(names.items()):
            check("ip", "-n", ns, "route", "add", "default", "via",
                  addresses[site].rsplit(".", 1)[0] + ".1")
            check(*nat, "-t", "nat", "-A", "POSTROUTING", "-s", f"10.{SITE_NETS[i]}.{subnet}.0/24",
                  "-o", "gwp", "-j", "MASQUERADE")
            check(*nat, "-A", "FORWARD", "-o", f"gw{i}", "-m", "conntrack", "--ctstate",
                  "ESTABLISHED,RELATED", "-j", "ACCEPT")
            check(*nat, "-A", "FORWARD", "-o", f"gw{i}", "-j", "DROP")
        yield Nat(pub, gw, names, f"{outside}.2", addresses)
    finally:
        for name in created:
            sh("ip", "netns", "del", name)


def connects(netns: str, host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection from inside `netns` to host:port is set up within `timeout`."""
    done = sh("ip", "netns", "exec", netns, "timeout", str(timeout + 2), "bash", "-c",
              f"exec 3<>/dev/tcp/{host}/{port}")
    return done.returncode == 0
