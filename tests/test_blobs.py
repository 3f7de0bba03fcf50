"""Content-addressed blobs: manifests, verified multi-source fetches that resume after any
interruption, and the fsspec blob store. Real files, real fsspec, small chunks."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.mesh import blob_partial
from orchestrator.mesh.blob_fetch import BlobFetchError, ChunkSource, UnknownBlobError, fetch_blob
from orchestrator.mesh.blob_manifest import (
    BlobManifest,
    ManifestBuilder,
    ManifestError,
    manifest_of,
)
from orchestrator.mesh.blob_partial import BlobBusyError, PartialBlob, bits_path, part_path
from orchestrator.mesh.blob_store import BlobStore, FsspecBlobStore
from runstore.errors import InputError

REPO = Path(__file__).resolve().parents[1]
CHUNK = 64 * 1024
CHUNKS = 20
SIZE = CHUNK * (CHUNKS - 1) + 1234  # the last chunk is short


def write_blob(path: Path, size: int = SIZE, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def memory_store(chunk_size: int = CHUNK) -> FsspecBlobStore:
    return FsspecBlobStore(f"memory://blobs-{uuid.uuid4().hex}", chunk_size=chunk_size)


class Peer:
    """A chunk source in front of a store, as a libp2p peer would be, with injected faults:
    dies after `die_after` good reads, flips a byte in `flip` chunks, or hangs on `hang`."""

    def __init__(self, store: FsspecBlobStore, name: str, die_after: int | None = None,
                 flip: set[int] | None = None, hang: threading.Event | None = None) -> None:
        self.store, self.name = store, name
        self.die_after, self.flip, self.hang = die_after, flip or set(), hang
        self.served: list[int] = []  # chunk offsets returned, good or bad
        self.lock = threading.Lock()

    def manifest(self, root: str) -> BlobManifest | None:
        return self.store.manifest(root)

    def read(self, root: str, offset: int, length: int) -> bytes:
        if self.hang is not None:
            self.hang.wait(timeout=30)
            raise ConnectionError("hung peer released")
        with self.lock:
            if self.die_after is not None and len(self.served) >= self.die_after:
                raise ConnectionError(f"{self.name} is gone")
            self.served.append(offset)
        data = bytearray(self.store.read(root, offset, length))
        if offset // self.store.chunk_size in self.flip:
            data[len(data) // 2] ^= 0x01
        return bytes(data)


def seeded(tmp_path: Path, *stores: FsspecBlobStore, size: int = SIZE) -> tuple[bytes, str]:
    data = write_blob(tmp_path / "source.bin", size)
    roots = {store.put(tmp_path / "source.bin").root for store in stores}
    assert len(roots) == 1
    return data, roots.pop()


def done_bits(dest: Path, chunks: int) -> set[int]:
    return blob_partial.decode_bits(json.loads(bits_path(dest).read_text())["done"], chunks)


# manifests

def test_manifest_is_built_by_streaming_and_round_trips_as_json(tmp_path):
    data = write_blob(tmp_path / "a.bin")
    manifest = manifest_of(str(tmp_path / "a.bin"), chunk_size=CHUNK)
    assert (manifest.size, manifest.chunk_size, manifest.chunk_count) == (SIZE, CHUNK, CHUNKS)
    assert manifest.sha256 == sha(data)
    assert list(manifest.chunks) == [sha(data[i:i + CHUNK]) for i in range(0, SIZE, CHUNK)]
    assert manifest.span(CHUNKS - 1) == (CHUNK * (CHUNKS - 1), 1234)
    assert BlobManifest.from_json(manifest.to_json(), root=manifest.root) == manifest
    # Blocks of any size give the same manifest; another chunk size is another address.
    builder = ManifestBuilder(CHUNK)
    for start in range(0, SIZE, 10_007):
        builder.update(data[start:start + 10_007])
    assert builder.finish() == manifest
    assert manifest_of(str(tmp_path / "a.bin"), chunk_size=CHUNK * 2).root != manifest.root
    store = memory_store()
    assert store.put(tmp_path / "a.bin") == manifest
    assert manifest_of(store.blob_url(manifest.root), chunk_size=CHUNK) == manifest


def test_a_bad_or_mismatched_manifest_is_refused_with_a_clear_error(tmp_path):
    write_blob(tmp_path / "a.bin")
    good = manifest_of(str(tmp_path / "a.bin"), chunk_size=CHUNK).to_dict()
    other = manifest_of(str(tmp_path / "a.bin"), chunk_size=CHUNK * 2).root

    def refused(data, root=None):
        with pytest.raises(ManifestError) as caught:
            BlobManifest.from_json(json.dumps(data) if not isinstance(data, str) else data,
                                   where="peer-7", root=root)
        assert str(caught.value).startswith("peer-7: ")
        return str(caught.value)

    tampered = {**good, "chunks": [good["chunks"][1], *good["chunks"][1:]]}
    assert "not to the root" in refused(tampered)
    assert "not of " + other in refused(good, root=other)
    assert "not valid JSON" in refused('{"size": 1,')
    assert "missing ['sha256']" in refused({k: v for k, v in good.items() if k != "sha256"})
    assert "make 20 chunks, not 19" in refused({**good, "chunks": good["chunks"][:-1]})
    assert "chunk_size" in refused({**good, "chunk_size": 1 << 40})
    assert "size must be" in refused({**good, "size": True})
    assert "chunk 2's sha256" in refused({**good, "chunks": [*good["chunks"][:2], "zz",
                                                             *good["chunks"][3:]]})


def test_a_store_refuses_a_corrupt_manifest_and_a_fetch_names_it(tmp_path):
    store = memory_store()
    _, root = seeded(tmp_path, store)
    import fsspec

    fs = fsspec.filesystem("memory")
    text = json.loads(fs.cat_file(store.manifest_url(root)))
    text["size"] += 1
    fs.pipe_file(store.manifest_url(root), json.dumps(text).encode())
    with pytest.raises(ManifestError, match=store.manifest_url(root)):
        FsspecBlobStore(store.url, chunk_size=CHUNK).manifest(root)
    with pytest.raises(UnknownBlobError, match=f"blob {root}: no source has it") as caught:
        fetch_blob(root, tmp_path / "out.bin", [FsspecBlobStore(store.url, name="bucket")])
    assert "bucket: manifest: ManifestError" in str(caught.value)
    assert not part_path(tmp_path / "out.bin").exists()


# fetching

def test_a_multi_chunk_blob_arrives_whole_and_leaves_no_sidecars(tmp_path):
    store = FsspecBlobStore(f"file://{tmp_path}/bucket", chunk_size=CHUNK)
    data, root = seeded(tmp_path, store)
    dest = tmp_path / "out" / "weights.safetensors"
    result = store.get(root, dest)
    assert sha(dest.read_bytes()) == sha(data)
    assert (result.chunks_total, result.chunks_fetched) == (CHUNKS, CHUNKS)
    assert result.chunks_present == 0
    assert result.bytes_by_source == {store.name: SIZE}
    assert result.bad_sources == {} and result.dropped == [] and result.chunks_refetched == 0
    assert sorted(p.name for p in dest.parent.iterdir()) == ["weights.safetensors"]


def test_chunks_are_split_among_three_sources(tmp_path):
    stores = [memory_store(), FsspecBlobStore(f"file://{tmp_path}/b", chunk_size=CHUNK),
              memory_store()]
    data, root = seeded(tmp_path, *stores)
    peers = [Peer(store, f"peer-{i}") for i, store in enumerate(stores)]
    result = fetch_blob(root, tmp_path / "out.bin", peers, max_workers=6, per_source=2)
    assert sha((tmp_path / "out.bin").read_bytes()) == sha(data)
    served = [len(peer.served) for peer in peers]
    assert all(count > 0 for count in served), served
    assert sum(served) == CHUNKS  # every chunk read once, from one of them
    assert [result.sources[p.name].chunks for p in peers] == served
    assert sum(result.bytes_by_source.values()) == SIZE


def test_a_source_that_dies_mid_transfer_then_a_restart_fetches_only_the_missing_chunks(tmp_path):
    store = memory_store()
    data, root = seeded(tmp_path, store)
    dest = tmp_path / "out.bin"
    dying = Peer(store, "dying", die_after=7)
    with pytest.raises(BlobFetchError) as caught:
        fetch_blob(root, dest, [dying], max_failures=2)
    err = caught.value
    assert err.root == root and err.missing == list(range(7, CHUNKS))
    assert f"blob {root}: 13 of 20 chunks" in str(err) and "chunks 7-19" in str(err)
    assert "dying is gone" in str(err) and err.result.dropped == ["dying"]
    assert not dest.exists() and part_path(dest).exists()
    assert done_bits(dest, CHUNKS) == set(range(7))

    fresh = Peer(store, "fresh")
    result = fetch_blob(root, dest, [fresh])
    assert sha(dest.read_bytes()) == sha(data)
    assert (result.chunks_present, result.chunks_fetched) == (7, CHUNKS - 7)
    assert sorted(fresh.served) == [i * CHUNK for i in range(7, CHUNKS)]
    assert not part_path(dest).exists() and not bits_path(dest).exists()


def test_a_flipped_byte_is_rejected_refetched_elsewhere_and_its_source_reported(tmp_path):
    store = memory_store()
    data, root = seeded(tmp_path, store)
    liar = Peer(store, "liar", flip=set(range(CHUNKS)))
    honest = Peer(store, "honest")
    result = fetch_blob(root, tmp_path / "out.bin", [liar, honest], max_workers=4, per_source=2)
    assert sha((tmp_path / "out.bin").read_bytes()) == sha(data)
    bad = len(liar.served)
    assert bad >= 1 and result.bad_sources == {"liar": bad}
    assert result.sources["liar"].chunks == 0 and "sha256 does not match" in \
        result.sources["liar"].last_error
    assert result.dropped == ["liar"]
    assert result.chunks_refetched == bad and result.sources["honest"].chunks == CHUNKS


def test_the_part_file_never_holds_an_unverified_chunk(tmp_path):
    store = memory_store()
    data, root = seeded(tmp_path, store)
    dest = tmp_path / "out.bin"
    liar = Peer(store, "liar", flip={3})
    with pytest.raises(BlobFetchError) as caught:
        fetch_blob(root, dest, [liar], max_failures=3, max_bad_chunks=100)
    assert caught.value.missing == [3]
    assert liar.served.count(3 * CHUNK) == 3  # asked three times, then given up
    part = part_path(dest).read_bytes()
    assert len(part) == SIZE and part[3 * CHUNK:4 * CHUNK] == bytes(CHUNK)
    done = done_bits(dest, CHUNKS)
    assert done == set(range(CHUNKS)) - {3}
    assert all(part[i * CHUNK:(i + 1) * CHUNK] == data[i * CHUNK:(i + 1) * CHUNK] for i in done)

    result = fetch_blob(root, dest, [Peer(store, "honest")])
    assert (result.chunks_present, result.chunks_fetched) == (CHUNKS - 1, 1)
    assert dest.read_bytes() == data


def test_a_kill_between_writing_a_chunk_and_recording_it_refetches_that_chunk(tmp_path,
                                                                              monkeypatch):
    store = memory_store()
    data, root = seeded(tmp_path, store)
    dest = tmp_path / "out.bin"
    saves = []
    real_save = PartialBlob._save_bits

    def save_then_die(self):
        saves.append(len(self.done))
        if len(saves) == 6:  # the empty bitfield, chunks 0-3 recorded, then chunk 4 written
            raise KeyboardInterrupt("killed after the chunk's bytes, before its bit")
        real_save(self)

    monkeypatch.setattr(PartialBlob, "_save_bits", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fetch_blob(root, dest, [Peer(store, "peer")], max_workers=1)
    monkeypatch.setattr(PartialBlob, "_save_bits", real_save)
    assert done_bits(dest, CHUNKS) == {0, 1, 2, 3}
    assert part_path(dest).read_bytes()[4 * CHUNK:5 * CHUNK] == data[4 * CHUNK:5 * CHUNK]

    peer = Peer(store, "peer")
    result = fetch_blob(root, dest, [peer])
    assert (result.chunks_present, result.chunks_fetched) == (4, CHUNKS - 4)
    assert 4 * CHUNK in peer.served and dest.read_bytes() == data


CHILD = """
import sys, time
from pathlib import Path
from orchestrator.mesh.blob_fetch import fetch_blob
from orchestrator.mesh.blob_store import FsspecBlobStore
url, root, dest, marker, stop_at = sys.argv[1:6]
store = FsspecBlobStore(url, chunk_size={chunk})

class Stalls:
    name = "stalls"
    reads = 0
    def manifest(self, root):
        return store.manifest(root)
    def read(self, root, offset, length):
        Stalls.reads += 1
        if Stalls.reads > int(stop_at):
            Path(marker).write_text("stalled")
            time.sleep(600)
        return store.read(root, offset, length)

fetch_blob(root, dest, [Stalls()], max_workers=1)
"""


def test_a_fetch_killed_with_sigkill_resumes_with_only_the_missing_chunks(tmp_path):
    store = FsspecBlobStore(f"file://{tmp_path}/bucket", chunk_size=CHUNK)
    data, root = seeded(tmp_path, store)
    dest, marker = tmp_path / "out.bin", tmp_path / "stalled"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(chunk=CHUNK), store.url, root, str(dest),
         str(marker), "9"], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for _ in range(600):  # bounded: at most a minute for the child to reach chunk 9
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), f"child ended early with {child.returncode}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert done_bits(dest, CHUNKS) == set(range(9))
    peer = Peer(store, "peer")
    result = fetch_blob(root, dest, [peer])
    assert (result.chunks_present, result.chunks_fetched) == (9, CHUNKS - 9)
    assert len(peer.served) == CHUNKS - 9 and dest.read_bytes() == data


def test_a_hung_read_times_out_and_the_chunk_goes_to_another_source(tmp_path):
    store = memory_store()
    data, root = seeded(tmp_path, store)
    release = threading.Event()
    try:
        hung, good = Peer(store, "hung", hang=release), Peer(store, "good")
        result = fetch_blob(root, tmp_path / "out.bin", [hung, good], read_timeout=0.3,
                            max_failures=1)
    finally:
        release.set()
    assert (tmp_path / "out.bin").read_bytes() == data
    report = result.sources["hung"]
    assert report.failures >= 1 and report.dropped and report.chunks == 0
    assert "no answer in 0.3s" in report.last_error
    assert result.sources["good"].chunks == CHUNKS and result.chunks_refetched == report.failures


def test_a_chunk_corrupted_on_disk_after_it_was_recorded_is_found_and_fetched_again(tmp_path):
    store = memory_store()
    data, root = seeded(tmp_path, store)
    dest = tmp_path / "out.bin"
    with pytest.raises(BlobFetchError):
        fetch_blob(root, dest, [Peer(store, "dying", die_after=5)], max_failures=1)
    with part_path(dest).open("r+b") as part:  # the disk flips a bit in recorded chunk 2
        part.seek(2 * CHUNK + 10)
        byte = part.read(1)
        part.seek(2 * CHUNK + 10)
        part.write(bytes([byte[0] ^ 0x80]))
    result = fetch_blob(root, dest, [Peer(store, "peer")])
    assert (result.chunks_present, result.chunks_repaired) == (5, 1)
    assert dest.read_bytes() == data


def test_an_unknown_root_is_refused_and_leaves_nothing(tmp_path):
    store = memory_store()
    _, root = seeded(tmp_path, store)
    unknown = sha(b"never stored")
    with pytest.raises(UnknownBlobError, match=f"blob {unknown}: no source has it") as caught:
        store.get(unknown, tmp_path / "out.bin", sources=[Peer(memory_store(), "peer")])
    assert caught.value.root == unknown and store.name in str(caught.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "source.bin"]
    with pytest.raises(InputError, match="not a blob root"):
        fetch_blob(root[:10], tmp_path / "out.bin", [store])


def test_two_fetches_never_write_one_destination_at_once(tmp_path):
    store = memory_store()
    _, root = seeded(tmp_path, store)
    holder = PartialBlob(tmp_path / "out.bin", store.manifest(root))
    try:
        with pytest.raises(BlobBusyError, match="another fetch"):
            store.get(root, tmp_path / "out.bin")
    finally:
        holder.close()


def test_an_empty_blob_round_trips(tmp_path):
    store = memory_store()
    _, root = seeded(tmp_path, store, size=0)
    assert store.manifest(root).chunk_count == 0
    result = store.get(root, tmp_path / "empty.bin")
    assert (tmp_path / "empty.bin").read_bytes() == b"" and result.chunks_fetched == 0


# the store

@pytest.mark.parametrize("protocol", ["memory", "file"])
def test_the_fsspec_store_round_trips(tmp_path, protocol):
    url = (f"memory://store-{uuid.uuid4().hex}" if protocol == "memory"
           else f"file://{tmp_path}/store")
    store = FsspecBlobStore(url, chunk_size=CHUNK)
    assert isinstance(store, BlobStore) and isinstance(store, ChunkSource)
    data = write_blob(tmp_path / "a.bin")
    manifest = store.put(tmp_path / "a.bin")
    root = manifest.root
    assert store.blob_url(root) == f"{url}/blobs/{root[:2]}/{root}"
    assert store.has(root) and not store.has(sha(b"other"))
    assert store.manifest(sha(b"other")) is None
    reopened = FsspecBlobStore(url, chunk_size=CHUNK)  # nothing cached
    assert reopened.manifest(root) == manifest
    assert reopened.read(root, CHUNK - 5, 10) == data[CHUNK - 5:CHUNK + 5]
    with pytest.raises(ValueError, match="outside blob"):
        reopened.read(root, SIZE - 5, 10)
    assert store.put(tmp_path / "a.bin") == manifest  # the same bytes, the same blob
    result = reopened.get(root, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data and result.bytes_by_source == {url: SIZE}
    # A store without the blob, mixed with a peer that has it: the peer carries it.
    empty = memory_store()
    result = empty.get(root, tmp_path / "again.bin", sources=[Peer(store, "peer")])
    assert (tmp_path / "again.bin").read_bytes() == data
    assert not result.sources[empty.name].has_blob and result.bytes_by_source["peer"] == SIZE


class SelfContradicting(Peer):
    """Serves the right chunks under a manifest whose whole-file sha256 is wrong (its root
    matches its fields, so only hashing the whole file can tell)."""

    def manifest(self, root: str) -> BlobManifest | None:
        real = self.store.manifest(self.real_root)
        return BlobManifest(real.size, real.chunk_size, "0" * 64, real.chunks)


def test_verify_whole_refuses_a_manifest_that_contradicts_its_chunks(tmp_path):
    store = memory_store()
    data, real_root = seeded(tmp_path, store)
    real = store.manifest(real_root)
    lying = BlobManifest(real.size, real.chunk_size, "0" * 64, real.chunks)
    source = SelfContradicting(store, "liar")
    source.real_root = real_root
    source.read = lambda root, offset, length: store.read(real_root, offset, length)
    # Chunk hashes bind the file to the root, which is all a default fetch checks.
    assert fetch_blob(lying.root, tmp_path / "fast", [source]).chunks_fetched == CHUNKS
    assert (tmp_path / "fast").read_bytes() == data
    with pytest.raises(BlobFetchError, match="inconsistent manifest"):
        fetch_blob(lying.root, tmp_path / "whole", [source], verify_whole=True)
    assert not (tmp_path / "whole").exists() and not part_path(tmp_path / "whole").exists()
