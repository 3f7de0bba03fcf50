"""The bulk channel on its own: a BulkServer on 127.0.0.1 (its accept and connection threads
in this process) and BulkPeer clients, over real TCP. Who gets a ticket is the mesh
daemon's business (tests/test_mesh_daemon.py); here, what a connection must hold to be
served."""

from __future__ import annotations

import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator.mesh.blob_store import FsspecBlobStore
from orchestrator.mesh.bulk_channel import MAGIC, ChannelError, SealedSocket
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
    client = BulkPeer(server.issue(peer), ["127.0.0.1"])
    got = b"".join(client.read(manifest.root, *manifest.span(i))
                   for i in range(manifest.chunk_count))
    assert got == data
    assert client.address == ("127.0.0.1", server.port)
    assert len(client._open_connections) == 1
    client.close()


def test_a_refused_range_keeps_the_connection_and_names_the_reason(served):
    server, _, peer, manifest, _ = served
    client = BulkPeer(server.issue(peer), ["127.0.0.1"])
    with pytest.raises(BulkRefused, match="refused"):
        client.read(manifest.root, 0, CHUNK + 1)
    with pytest.raises(BulkRefused, match="unknown blob"):
        client.read("0" * 64, 0, 10)
    assert len(client._open_connections) == 1
    assert len(client.read(manifest.root, 10, 90)) == 90
    client.close()


@pytest.mark.parametrize("tamper, reason", [
    ({"ticket_id": "ab" * 16}, "unknown or expired"),
    ({"secret": "00" * 32}, "did not confirm"),
])
def test_a_forged_ticket_or_a_wrong_secret_gets_nothing(served, tamper, reason):
    server, _, peer, manifest, _ = served
    client = BulkPeer({**server.issue(peer), **tamper}, ["127.0.0.1"])
    with pytest.raises(BulkReadError, match=reason):
        client.read(manifest.root, 0, 100)


def test_an_expired_ticket_is_refused(served, tmp_path):
    server, gate, peer, manifest, _ = served
    short = BulkServer(server.store, gate, "/ip4/127.0.0.1/tcp/0", ticket_seconds=0.2)
    try:
        ticket = short.issue(peer)
        time.sleep(0.5)
        with pytest.raises(BulkReadError, match="unknown or expired"):
            BulkPeer(ticket, ["127.0.0.1"]).read(manifest.root, 0, 100)
    finally:
        short.close()


def test_a_peer_taken_off_the_roster_is_refused_on_its_open_connection_and_new_ones(served):
    server, gate, peer, manifest, _ = served
    client = BulkPeer(server.issue(peer), ["127.0.0.1"])
    assert len(client.read(manifest.root, 0, 100)) == 100
    gate.replace(Roster.of([], epoch=1))
    with pytest.raises((BulkRefused, BulkReadError), match="not on the roster"):
        client.read(manifest.root, 0, 100)
    with pytest.raises(BulkReadError, match="not on the roster"):
        BulkPeer(server.issue(peer), ["127.0.0.1"]).read(manifest.root, 0, 100)


def test_a_client_without_the_secret_gets_no_byte_of_a_blob(served):
    """Replaying a ticket id and then speaking plain frames gets the connection closed."""
    server, _, peer, manifest, _ = served
    ticket_id = bytes.fromhex(server.issue(peer)["ticket_id"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(MAGIC + ticket_id + bytes(32) + encode({"hello": 1}) + encode(
            {"op": "read", "root": manifest.root, "offset": 0, "length": 100}))
        received = b""
        try:
            while chunk := raw.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert len(received) == 33 and received[0] == 0   # admitted, then nothing more


def test_sealed_records_are_ciphertext_and_tampering_is_detected():
    """What goes over the wire: no plaintext of the payload, and a flipped bit refused."""
    left, right = socket.socketpair()
    key_a, key_b = bytes(range(32)), bytes(range(32, 64))
    sender, receiver = SealedSocket(left, key_a, key_b), SealedSocket(right, key_b, key_a)
    payload = b"weights " * 300_000          # more than one record
    sending = threading.Thread(target=sender.send_frame, args=({"ok": True}, payload))
    sending.start()
    header, got = receiver.receive_frame()
    sending.join(30)
    assert header["size"] == len(payload) and got == payload
    tap_left, tap_right = socket.socketpair()
    SealedSocket(tap_left, key_a, key_b).send_frame({"ok": True}, b"secret bytes")
    wire = bytearray(tap_right.recv(65536))
    assert b"secret bytes" not in wire and b'"ok"' not in wire
    wire[-1] ^= 1
    left.sendall(wire)
    with pytest.raises(ChannelError, match="authentication"):
        # The receiver expects the sender's next counter: replayed and tampered alike fail.
        receiver.receive_frame()


def test_an_unreachable_bulk_address_says_so_for_a_fallback(served):
    server, _, peer, manifest, _ = served
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    ticket = {**server.issue(peer), "port": port}
    with pytest.raises(BulkUnreachable, match=f"127.0.0.1:{port}"):
        BulkPeer(ticket, ["127.0.0.1"]).read(manifest.root, 0, 100)


def test_reads_from_many_threads_are_pipelined_on_a_few_connections_in_order(served):
    """Eight threads, two connections: every read gets its own range back, whatever the
    interleaving of requests and responses."""
    server, _, peer, manifest, data = served
    client = BulkPeer(server.issue(peer), ["127.0.0.1"], connections=2)
    spans = [(offset, 1000 + offset % 7919) for offset in range(0, len(data) - 9000, 9001)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda span: client.read(manifest.root, *span), spans * 3))
    assert got == [data[o:o + n] for o, n in spans * 3]
    assert len(client._open_connections) == 2
    client.close()
