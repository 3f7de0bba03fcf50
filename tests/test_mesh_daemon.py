"""The mesh daemon and its client: every daemon is its own process on 127.0.0.1, the test
process holds only MeshClients. One module fixture starts a roster of five daemons (a, b, c,
d, and f, which offers no bulk channel) and one peer off the roster (e); the tests that kill
a daemon run last and restart it."""

from __future__ import annotations

import hashlib
import random
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.mesh.blob_fetch import BlobFetchError, UnknownBlobError, fetch_blob
from orchestrator.mesh.blob_store import FsspecBlobStore
from orchestrator.mesh.client import (
    MeshDaemonGone,
    MeshError,
    PeerChunkSource,
)
from orchestrator.mesh.identity import load_identity
from tests.mesh_daemons import CHUNK, ECHO, SILENT, Daemon, running


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> dict[str, Daemon]:
    folder = tmp_path_factory.mktemp("daemons")
    ids = {name: str(load_identity(folder / f"{name}.key").peer_id) for name in "abcdef"}
    roster = [ids[name] for name in "abcdf"]
    # e admits a, so only a's roster refuses e.
    daemons = {name: Daemon(name, folder, roster + ([ids["e"]] if name == "e" else []),
                            ids[name]) for name in "abcde"}
    # f offers no bulk channel: its blobs go over libp2p streams.
    daemons["f"] = Daemon("f", folder, roster, ids["f"], mesh={"bulk": {"enabled": False}})
    with running(daemons, "abcdf") as started:
        yield started


def put_blob(daemon: Daemon, tmp_path: Path, size: int, seed: int) -> tuple[str, str]:
    """A random file of `size` bytes in `daemon`'s store; (root, sha256)."""
    data = random.Random(seed).randbytes(size)
    source = tmp_path / f"source-{seed}"
    source.write_bytes(data)
    manifest = FsspecBlobStore(daemon.store_url, chunk_size=CHUNK).put(source)
    return manifest.root, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("transport", ["bulk", "libp2p"])
def test_a_multi_chunk_blob_is_fetched_over_the_wire(mesh, tmp_path, transport):
    a, b = mesh["a"], mesh["b"]
    root, sha256 = put_blob(a, tmp_path, 3_000_000, seed=1)
    dest = tmp_path / "fetched"
    source = PeerChunkSource(b.client, a.peer_id, timeout=60, bulk=transport == "bulk")
    result = fetch_blob(root, dest, [source], read_timeout=60)
    source.close()
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha256
    assert (result.chunks_total, result.chunks_fetched, result.chunks_present) == (12, 12, 0)
    assert result.bytes_by_source == {f"peer:{a.peer_id}": 3_000_000}
    assert source.transport == transport and source.fallback_reason is None
    assert not FsspecBlobStore(b.store_url).has(root)  # it came from a, not b's own store


def test_a_peer_without_a_bulk_channel_serves_its_blobs_over_libp2p(mesh, tmp_path):
    b, f = mesh["b"], mesh["f"]
    root, sha256 = put_blob(f, tmp_path, 700_000, seed=4)
    source = PeerChunkSource(b.client, f.peer_id, timeout=60)
    fetch_blob(root, tmp_path / "fetched", [source], read_timeout=60)
    assert hashlib.sha256((tmp_path / "fetched").read_bytes()).hexdigest() == sha256
    assert source.transport == "libp2p"
    assert "offers no bulk channel" in source.fallback_reason


@pytest.mark.parametrize("bulk", [True, False])
def test_an_unknown_root_or_a_range_out_of_bounds_is_refused(mesh, tmp_path, bulk):
    a, b = mesh["a"], mesh["b"]
    unknown = hashlib.sha256(b"no such blob").hexdigest()
    with pytest.raises(UnknownBlobError, match="no source has it"):
        b.client.fetch_blob(unknown, tmp_path / "never", [a.peer_id], timeout=30, bulk=bulk)
    assert not (tmp_path / "never").exists()
    root, _ = put_blob(a, tmp_path, 600_000, seed=2)
    source = PeerChunkSource(b.client, a.peer_id, timeout=30, bulk=bulk)
    assert source.manifest(root).size == 600_000
    assert len(source.read(root, 599_000, 1000)) == 1000
    with pytest.raises(MeshError, match="refused"):
        source.read(root, 599_000, 1001)          # past the end
    with pytest.raises(MeshError, match="refused"):
        source.read(root, 0, CHUNK + 1)           # more than a chunk
    with pytest.raises(MeshError, match="unknown blob"):
        source.read(unknown, 0, 10)


def test_a_thousand_requests_across_four_peers_all_get_their_response(mesh):
    names = "abcd"
    before = {name: len(mesh[name].served) for name in names}

    def send(sender: str, index: int) -> tuple[str, bytes, bytes]:
        target = [n for n in names if n != sender][index % 3]
        payload = f"{sender}->{target}#{index}".encode()
        return target, payload, mesh[sender].client.request(mesh[target].peer_id, ECHO,
                                                            payload, timeout=60)

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(send, sender, index) for sender in names for index in range(250)]
        results = [future.result(timeout=300) for future in futures]
    assert len(results) == 1000
    for target, payload, response in results:
        assert response == target.encode() + b":" + payload
    for name in names:
        got = {r.payload for r in mesh[name].served[before[name]:] if r.protocol == ECHO}
        sent = {payload for target, payload, _ in results if target == name}
        assert got == sent, f"{name}: {len(sent - got)} requests never served"
    assert len({payload for _, payload, _ in results}) == 1000


def test_a_peer_off_the_roster_cannot_make_a_request(mesh):
    a, e = mesh["a"], mesh["e"]
    served_before = len(a.served)
    with pytest.raises(MeshError, match=f"dial {a.address}"):
        e.client.dial(a.address, timeout=20)
    with pytest.raises(MeshError, match=f"peer {a.peer_id} on {ECHO}"):
        e.client.request(a.peer_id, ECHO, b"let me in", timeout=20)
    assert not [r for r in a.served[served_before:] if r.peer == e.peer_id]
    assert f"refused peer {e.peer_id}" in a.log.read_text()
    assert e.peer_id not in a.client.peers()


class KillAfter:
    """A peer source that SIGKILLs the serving daemon once it has served `reads` reads."""

    def __init__(self, source: PeerChunkSource, daemon: Daemon, reads: int) -> None:
        self.source, self.daemon, self.reads = source, daemon, reads
        self.name = source.name
        self.done = 0

    def manifest(self, root: str):
        return self.source.manifest(root)

    def read(self, root: str, offset: int, length: int) -> bytes:
        data = self.source.read(root, offset, length)
        self.done += 1
        if self.done == self.reads:
            self.daemon.process.send_signal(signal.SIGKILL)
        return data


def test_a_fetch_resumes_after_the_serving_daemon_is_killed(mesh, tmp_path):
    a, b = mesh["a"], mesh["b"]
    root, sha256 = put_blob(a, tmp_path, 3_000_000, seed=3)
    dest = tmp_path / "resumed"
    source = KillAfter(PeerChunkSource(b.client, a.peer_id, timeout=20), a, reads=4)
    with pytest.raises(BlobFetchError) as failed:
        fetch_blob(root, dest, [source], max_workers=1, read_timeout=20)
    assert len(failed.value.missing) == 8 and not dest.exists()
    a.kill()
    a.client.close()
    a.start()
    a.wait_ready()
    b.client.dial(a.address)
    result = b.client.fetch_blob(root, dest, [a.peer_id], timeout=60)
    assert (result.chunks_present, result.chunks_fetched, result.chunks_total) == (4, 8, 12)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha256


def test_a_killed_daemon_gives_its_client_daemon_gone_and_a_restart_works(mesh):
    a, d = mesh["a"], mesh["d"]
    old = d.client
    pending: list[BaseException] = []

    def wait_for_silence() -> None:
        try:
            old.request(a.peer_id, SILENT, b"never answered", timeout=60)
        except BaseException as error:
            pending.append(error)

    waiter = threading.Thread(target=wait_for_silence, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 60
    while not [r for r in a.served if r.protocol == SILENT] and time.monotonic() < deadline:
        time.sleep(0.05)   # the request is in flight once a's client has it
    d.kill()
    waiter.join(30)
    assert len(pending) == 1 and isinstance(pending[0], MeshDaemonGone), pending
    with pytest.raises(MeshDaemonGone) as later:
        old.peers()
    message = str(later.value)
    assert str(d.socket) in message and "restart it" in message and "\n" not in message
    d.start()
    d.wait_ready()
    assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
    assert d.client is not old and d.client.peer_id == d.peer_id
    d.client.dial(a.address)
    assert d.client.request(a.peer_id, ECHO, b"back", timeout=30) == b"a:back"
