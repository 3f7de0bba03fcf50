"""An island behind a NAT is reached through its relay, and only so. Runs where the machine
allows it (root, `ip` from iproute2, `iptables`, network namespaces), else it is skipped
with the reason. The island sits in a site behind the NAT of tests/netns.py, the relay and
the dialer on its public side; the root namespace is left as it was.

The daemons run inside the namespaces with `ip netns exec`; their clients reach them from
this process over their Unix sockets (a socket file is not bound to a network namespace),
except the blob fetches, whose clients open bulk connections themselves and so run in their
daemon's namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.mesh.blob_store import FsspecBlobStore
from orchestrator.mesh.client import MeshError
from orchestrator.mesh.identity import load_identity
from tests.mesh_daemons import CHUNK, ECHO, REPO, Daemon, running
from tests.netns import nat_namespaces


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """The island's namespace behind the NAT, the public one, and their addresses."""
    with nat_namespaces(["island"]) as nat:
        yield {"island": nat.sites["island"], "gw": nat.gw, "pub": nat.pub,
               "inside": nat.addresses["island"], "outside": nat.public_address}


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
