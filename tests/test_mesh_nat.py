"""An island behind a NAT is reached through its relay, and only so. Runs where the machine
allows it (root, `ip` from iproute2, `iptables`, network namespaces), else it is skipped
with the reason. Everything lives in three network namespaces the test creates, so the
root namespace is left as it was (no interface, route, sysctl or firewall rule added):

    isl-nat-R      the island          10.213.N.2/24, default route via the NAT
    isl-nat-R-gw   the NAT             10.213.N.1 | 10.214.N.1, forwards, MASQUERADEs
                                       10.213.N.0/24 out, drops new connections in
    isl-nat-R-pub  the public peers    10.214.N.2/24, default route via the NAT:
                   (relay and dialer)  the island's own address is routed, then dropped

The daemons run inside them with `ip netns exec`; their clients reach them from this
process over their Unix sockets (a socket file is not bound to a network namespace), except
the blob fetches, whose clients open bulk connections themselves and so run in their
daemon's namespace.
Deleting the namespaces at the end, after the daemons are killed, removes the veth pairs
and the NAT's iptables rules with them."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.mesh.blob_store import FsspecBlobStore
from orchestrator.mesh.client import MeshError
from orchestrator.mesh.identity import load_identity
from tests.mesh_daemons import CHUNK, ECHO, REPO, Daemon, running

COMMAND_TIMEOUT = 20.0


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


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """The three namespaces, wired as the module docstring draws them; deleted after."""
    if (reason := why_not()) is not None:
        pytest.skip(reason)
    tag, subnet = secrets.token_hex(3), 1 + secrets.randbelow(254)
    names = {"island": f"isl-nat-{tag}", "gw": f"isl-nat-{tag}-gw",
             "pub": f"isl-nat-{tag}-pub"}
    created: list[str] = []
    try:
        for name in names.values():
            done = sh("ip", "netns", "add", name)
            if done.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {done.stderr.strip()}")
            created.append(name)
        island, gw, pub = names["island"], names["gw"], names["pub"]
        inside, outside = f"10.213.{subnet}", f"10.214.{subnet}"
        nat = ("ip", "netns", "exec", gw, "iptables")
        if (done := sh(*nat, "-t", "nat", "-L", "-n")).returncode != 0:
            pytest.skip(f"iptables has no nat table here: {done.stderr.strip()}")
        # Each veth is created inside its namespaces, never in the root one.
        check("ip", "-n", island, "link", "add", "isl0", "type", "veth", "peer", "name",
              "gw0", "netns", gw)
        check("ip", "-n", pub, "link", "add", "pub0", "type", "veth", "peer", "name",
              "gw1", "netns", gw)
        for ns, device, address in ((island, "isl0", f"{inside}.2"), (gw, "gw0", f"{inside}.1"),
                                    (gw, "gw1", f"{outside}.1"), (pub, "pub0", f"{outside}.2")):
            check("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", device)
            check("ip", "-n", ns, "link", "set", device, "up")
        for ns in created:
            check("ip", "-n", ns, "link", "set", "lo", "up")
        check("ip", "-n", island, "route", "add", "default", "via", f"{inside}.1")
        check("ip", "-n", pub, "route", "add", "default", "via", f"{outside}.1")
        check("ip", "netns", "exec", gw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        check(*nat, "-t", "nat", "-A", "POSTROUTING", "-s", f"{inside}.0/24", "-o", "gw1",
              "-j", "MASQUERADE")
        check(*nat, "-A", "FORWARD", "-i", "gw1", "-o", "gw0", "-m", "conntrack",
              "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        check(*nat, "-A", "FORWARD", "-i", "gw1", "-o", "gw0", "-j", "DROP")
        yield {**names, "inside": f"{inside}.2", "outside": f"{outside}.2"}
    finally:
        for name in created:
            sh("ip", "netns", "del", name)


def test_an_island_behind_a_nat_is_reached_through_its_relay_and_not_directly(
        namespaces, tmp_path):
    ids = {name: str(load_identity(tmp_path / f"{name}.key").peer_id)
           for name in ("relay", "island", "dialer")}
    roster = list(ids.values())
    relay = Daemon("relay", tmp_path, roster, ids["relay"], relay_service=True,
                   host=namespaces["outside"], netns=namespaces["pub"])
    with running({"relay": relay}, ""):
        daemons = {"island": Daemon("island", tmp_path, roster, ids["island"],
                                    relays=[relay.address], host=namespaces["inside"],
                                    netns=namespaces["island"]),
                   "dialer": Daemon("dialer", tmp_path, roster, ids["dialer"],
                                    host=namespaces["outside"], netns=namespaces["pub"])}
        with running(daemons, ""):
            island, dialer = daemons["island"], daemons["dialer"]
            # The island dialled out through the NAT and holds a reservation.
            circuit = f"{relay.address}/p2p-circuit/p2p/{island.peer_id}"
            assert island.relay_addresses == [circuit]
            # (a) Its own address is not reachable from outside (checked first: once a
            # relayed connection exists, a dial of that peer returns at once).
            with pytest.raises(MeshError, match="dial"):
                dialer.client.dial(island.address, timeout=5)
            assert island.peer_id not in dialer.client.peers()
            # (b) Through the relay the request arrives and the reply comes back.
            assert dialer.client.dial(circuit, timeout=30) == island.peer_id
            assert dialer.client.request(island.peer_id, ECHO, b"through the nat",
                                         timeout=30) == b"island:through the nat"
            assert island.served[-1].peer == dialer.peer_id
            # Blobs: out of the island over libp2p through the relay (its bulk port cannot
            # be reached), into the island over the bulk channel once it dials out directly.
            # The fetch runs in the fetching daemon's namespace, as its client would.
            assert island.client.dial(dialer.address, timeout=30) == dialer.peer_id
            for source, sink, expected in ((island, dialer, "libp2p"),
                                           (dialer, island, "bulk")):
                data = os.urandom(600_000)
                (tmp_path / f"blob-{source.name}").write_bytes(data)
                root = FsspecBlobStore(source.store_url, chunk_size=CHUNK).put(
                    tmp_path / f"blob-{source.name}").root
                dest = tmp_path / f"fetched-by-{sink.name}"
                done = fetch_in(sink, source.peer_id, root, dest)
                assert dest.read_bytes() == data
                assert done["transport"] == expected, done
                assert (done["fallback_reason"] is None) == (expected == "bulk"), done


FETCH = """
import json, sys
from orchestrator.mesh.blob_fetch import fetch_blob
from orchestrator.mesh.client import MeshClient, PeerChunkSource
socket, peer, root, dest = sys.argv[1:]
with MeshClient(socket) as client:
    source = PeerChunkSource(client, peer, timeout=30)
    fetch_blob(root, dest, [source], read_timeout=30)
    source.close()
print(json.dumps({"transport": source.transport, "fallback_reason": source.fallback_reason}))
"""


def fetch_in(sink: Daemon, peer: str, root: str, dest: Path) -> dict[str, object]:
    """Fetch `root` from `peer` with a client process in `sink`'s network namespace."""
    done = subprocess.run(
        ["ip", "netns", "exec", sink.netns, sys.executable, "-c", FETCH, str(sink.socket),
         peer, root, str(dest)], capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
