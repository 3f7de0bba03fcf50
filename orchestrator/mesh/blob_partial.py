"""A blob being fetched to `<dest>`: `<dest>.part` holds the chunks at their offsets, and
`<dest>.part.bits` says which of them are done. A chunk is written only after it verified,
and its bit is set (the sidecar replaced atomically) only after its bytes were written, so a
fetch stopped at any point resumes from the bits and trusts nothing they do not list. No
fsync per chunk: after a power cut the page cache may not have reached the disk, so a resumed
fetch hashes the recorded chunks again before trusting them (`corrupt_chunks`); `commit`
syncs the whole file once."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path

from orchestrator.mesh.blob_manifest import READ_BLOCK, BlobManifest

PART_FORMAT = "islands-blob-part/1"


class BlobBusyError(RuntimeError):
    """Another fetch holds the same destination's `.part`."""


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def bits_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.bits")


def encode_bits(done: set[int], count: int) -> str:
    # Bit i is bit (i % 8) of byte i // 8, as hex: a few hundred bytes for a large blob.
    bitmap = bytearray(-(-count // 8))
    for index in done:
        bitmap[index // 8] |= 1 << (index % 8)
    return bitmap.hex()


def decode_bits(text: str, count: int) -> set[int]:
    bitmap = bytes.fromhex(text)
    if len(bitmap) != -(-count // 8):
        raise ValueError(f"bitmap of {len(bitmap)} bytes for {count} chunks")
    done = {i for i in range(count) if bitmap[i // 8] >> (i % 8) & 1}
    return done


class PartialBlob:
    """Open (or resume) the partial state of `manifest`'s blob at `dest`; holds an exclusive
    lock on the `.part` until `close`, so two fetches never interleave into one file."""

    def __init__(self, dest: Path, manifest: BlobManifest) -> None:
        self.dest = Path(dest)
        self.manifest = manifest
        self.part = part_path(self.dest)
        self.bits = bits_path(self.dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise BlobBusyError(f"{self.part}: another fetch is writing this blob") from None
        self.done = self._trusted_bits()
        self.resumed = len(self.done)
        if not self.done:
            self._reset()

    def _trusted_bits(self) -> set[int]:
        """The recorded chunks, if the sidecar is whole, names this very blob, and the `.part`
        still has the blob's size; anything else starts over."""
        try:
            data = json.loads(self.bits.read_bytes())
            if (data.get("format") != PART_FORMAT or data.get("root") != self.manifest.root
                    or os.fstat(self._fd).st_size != self.manifest.size):
                return set()
            return decode_bits(data["done"], self.manifest.chunk_count)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return set()

    def _reset(self) -> None:
        # Truncate to zero first so no stale bytes from an earlier blob survive the resize.
        os.ftruncate(self._fd, 0)
        os.ftruncate(self._fd, self.manifest.size)
        if self.manifest.size:
            try:  # reserve the space now, so a full disk fails before any transfer
                os.posix_fallocate(self._fd, 0, self.manifest.size)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        self.done = set()
        self._save_bits()

    def _save_bits(self) -> None:
        # Once per chunk, on a local disk: plain os calls, a temporary file and an atomic
        # rename, so a crash leaves the old sidecar or the new one.
        data = json.dumps({"format": PART_FORMAT, "root": self.manifest.root,
                           "done": encode_bits(self.done, self.manifest.chunk_count)}).encode()
        tmp = self.bits.with_name(self.bits.name + ".tmp")
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(descriptor, data)
        finally:
            os.close(descriptor)
        os.replace(tmp, self.bits)

    def missing(self) -> list[int]:
        return [i for i in range(self.manifest.chunk_count) if i not in self.done]

    def write_chunk(self, index: int, data: bytes | bytearray) -> None:
        """Write a chunk the caller verified, then record it as done."""
        offset, length = self.manifest.span(index)
        if len(data) != length:
            raise ValueError(f"chunk {index} is {len(data)} bytes, expected {length}")
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
        self.done.add(index)
        self._save_bits()

    def forget(self, indices: list[int]) -> None:
        self.done.difference_update(indices)
        self._save_bits()

    def whole_sha256(self) -> str:
        digest = hashlib.sha256()
        for offset in range(0, self.manifest.size, READ_BLOCK):
            digest.update(os.pread(self._fd, min(READ_BLOCK, self.manifest.size - offset),
                                   offset))
        return digest.hexdigest()

    def corrupt_chunks(self) -> list[int]:
        """Done chunks whose bytes on disk no longer match their hash."""
        bad = []
        for index in sorted(self.done):
            offset, length = self.manifest.span(index)
            if hashlib.sha256(os.pread(self._fd, length, offset)).hexdigest() != \
                    self.manifest.chunks[index]:
                bad.append(index)
        return bad

    def commit(self) -> None:
        """Move the finished `.part` into place (atomic rename), then drop the sidecar."""
        os.fsync(self._fd)
        os.replace(self.part, self.dest)
        self.bits.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.dest.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.bits.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
