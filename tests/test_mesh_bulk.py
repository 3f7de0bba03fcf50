"""The bulk channel on its own: a BulkServer on 127.0.0.1 (its accept and connection threads
in this process) and BulkPeer clients, over real TCP and TLS. Who gets a ticket is the mesh
daemon's business (tests/test_mesh_daemon.py); here, what a connection must hold to be
served."""

from __future__ import annotations

import random
import socket
import time

import pytest

from orchestrator.mesh.blob_store import FsspecBlobStore
from orchestrator.mesh.bulk_client import BulkPeer, BulkReadError, BulkRefused, BulkUnreachable
from orchestrator.mesh.bulk_server import BulkServer
from orchestrator.mesh.framing import encode
from orchestrator.mesh.identity import load_identity
from orchestrator.mesh.roster import Roster, RosterGate

CHUNK = 256 * 1024


@pytest.fixture
def served(tmp_path):
    """A server over a store holding one 3-chunk blob, and a peer on its roster."""
    peer = load_identity(tmp_path / "peer.key").peer_id
    store = FsspecBlobStore(f"file://{tmp_path}/store", chunk_size=CHUNK)
    data = random.Random(7).randbytes(3 * CHUNK - 100)
    (tmp_path / "blob").write_bytes(data)
    manifest = store.put(tmp_path / "blob")
    gate = RosterGate(Roster.of([peer]))
    server = BulkServer(store, gate, "/ip4/127.0.0.1/tcp/0", ticket_seconds=30)
    yield server, gate, peer, manifest, data
    server.close()


def test_a_ticket_holder_reads_every_chunk_over_one_reused_connection(served):
    server, _, peer, manifest, data = served
    client = BulkPeer(server.issue(peer), "127.0.0.1")
    got = b"".join(client.read(manifest.root, *manifest.span(i))
                   for i in range(manifest.chunk_count))
    assert got == data
    assert client.address == ("127.0.0.1", server.port) and len(client._idle) == 1
    client.close()


def test_a_refused_range_keeps_the_connection_and_names_the_reason(served):
    server, _, peer, manifest, _ = served
    client = BulkPeer(server.issue(peer), "127.0.0.1")
    with pytest.raises(BulkRefused, match="refused"):
        client.read(manifest.root, 0, CHUNK + 1)
    with pytest.raises(BulkRefused, match="unknown blob"):
        client.read("0" * 64, 0, 10)
    assert len(client._idle) == 1
    assert len(client.read(manifest.root, 10, 90)) == 90
    client.close()


@pytest.mark.parametrize("tamper, reason", [
    ({"ticket": "ab" * 32}, "unknown or expired"),
    ({"fingerprint": "00" * 32}, "not the pinned"),
])
def test_a_forged_ticket_or_another_certificate_gets_nothing(served, tamper, reason):
    server, _, peer, manifest, _ = served
    client = BulkPeer({**server.issue(peer), **tamper}, "127.0.0.1")
    with pytest.raises(BulkUnreachable, match=reason):
        client.read(manifest.root, 0, 100)


def test_an_expired_ticket_is_refused(served, tmp_path):
    server, gate, peer, manifest, _ = served
    short = BulkServer(server.store, gate, "/ip4/127.0.0.1/tcp/0", ticket_seconds=0.2)
    try:
        ticket = short.issue(peer)
        time.sleep(0.5)
        with pytest.raises(BulkUnreachable, match="unknown or expired"):
            BulkPeer(ticket, "127.0.0.1").read(manifest.root, 0, 100)
    finally:
        short.close()


def test_a_peer_taken_off_the_roster_is_refused_on_its_open_connection_and_new_ones(served):
    server, gate, peer, manifest, _ = served
    client = BulkPeer(server.issue(peer), "127.0.0.1")
    assert len(client.read(manifest.root, 0, 100)) == 100
    gate.replace(Roster.of([], epoch=1))
    with pytest.raises((BulkRefused, BulkReadError), match="not on the roster"):
        client.read(manifest.root, 0, 100)
    with pytest.raises(BulkUnreachable, match="not on the roster"):
        BulkPeer(server.issue(peer), "127.0.0.1").read(manifest.root, 0, 100)


def test_a_plaintext_client_gets_no_byte_of_a_blob(served):
    server, _, peer, manifest, _ = served
    ticket = server.issue(peer)["ticket"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(encode({"ticket": ticket}) + encode(
            {"op": "read", "root": manifest.root, "offset": 0, "length": 100}))
        received = b""
        try:
            while chunk := raw.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"ok" not in received and len(received) < 100


def test_an_unreachable_bulk_address_says_so_for_a_fallback(served):
    server, _, peer, manifest, _ = served
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    ticket = {**server.issue(peer), "port": port}
    with pytest.raises(BulkUnreachable, match=f"127.0.0.1:{port}"):
        BulkPeer(ticket, "127.0.0.1").read(manifest.root, 0, 100)
