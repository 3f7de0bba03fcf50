"""A blob's manifest: its size, chunk size, each chunk's sha256 and the whole file's sha256,
bound together by the root sha256, which is the blob's address. Built by streaming (memory
stays one block whatever the file's size) and stored as JSON; nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from runstore import storage
from runstore.errors import InputError

FORMAT = "islands-blob/1"
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
# A manifest may come from a peer; a cap keeps a hostile chunk size from sizing our buffers.
MAX_CHUNK_SIZE = 256 * 1024 * 1024
READ_BLOCK = 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYS = {"format", "root", "size", "chunk_size", "sha256", "chunks"}


class ManifestError(InputError):
    """A manifest that is malformed, or does not hash to the root it claims or was asked for."""


def is_root(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def root_of(size: int, chunk_size: int, sha256: str, chunks: tuple[str, ...] | list[str]) -> str:
    """The root covers every field, so a manifest that matches its root cannot lie about any of
    them. The same bytes cut in another chunk size have another root."""
    text = "\n".join([FORMAT, str(size), str(chunk_size), sha256, *chunks])
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class BlobManifest:
    size: int
    chunk_size: int
    sha256: str
    chunks: tuple[str, ...] = field(repr=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        problem = _problem(self.size, self.chunk_size, self.sha256, self.chunks)
        if problem:
            raise ManifestError("blob manifest", problem)
        object.__setattr__(self, "chunks", tuple(self.chunks))
        object.__setattr__(self, "root", root_of(self.size, self.chunk_size, self.sha256,
                                                 self.chunks))

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index`; the last chunk may be short."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def range_refusal(self, offset: object, length: object) -> str | None:
        """Why a peer's read of `length` bytes at `offset` is refused (at most one chunk,
        inside the blob), or None when it may be served."""
        if (isinstance(offset, int) and isinstance(length, int) and offset >= 0
                and 0 <= length <= self.chunk_size and offset + length <= self.size):
            return None
        return (f"range {offset}+{length} refused: blob {self.root} has {self.size} bytes "
                f"in chunks of {self.chunk_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "root": self.root, "size": self.size,
                "chunk_size": self.chunk_size, "sha256": self.sha256, "chunks": list(self.chunks)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str = "blob manifest",
                  root: str | None = None) -> BlobManifest:
        """Validate `data` and, when `root` is given, that it is the manifest of that blob."""
        if not isinstance(data, dict):
            raise ManifestError(where, f"expected a JSON object, got {type(data).__name__}")
        if set(data) != _KEYS:
            missing, extra = sorted(_KEYS - set(data)), sorted(set(data) - _KEYS)
            raise ManifestError(where, f"expected the keys {sorted(_KEYS)} (missing {missing}, "
                                       f"unexpected {extra})")
        if data["format"] != FORMAT:
            raise ManifestError(where, f"format is {data['format']!r}, expected {FORMAT!r}")
        chunks = data["chunks"]
        if not isinstance(chunks, list):
            raise ManifestError(where, "chunks must be a list of sha256 hex digests")
        problem = _problem(data["size"], data["chunk_size"], data["sha256"], chunks)
        if problem:
            raise ManifestError(where, problem)
        manifest = cls(data["size"], data["chunk_size"], data["sha256"], tuple(chunks))
        if manifest.root != data["root"]:
            raise ManifestError(where, f"its fields hash to root {manifest.root}, not to the "
                                       f"root {data['root']!r} it claims (tampered or corrupt)")
        if root is not None and manifest.root != root:
            raise ManifestError(where, f"is the manifest of blob {manifest.root}, not of {root}")
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "blob manifest",
                  root: str | None = None) -> BlobManifest:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise ManifestError(where, f"not valid JSON ({err})") from None
        return cls.from_dict(data, where, root)


def _problem(size: Any, chunk_size: Any, sha256: Any, chunks: Any) -> str | None:
    if not _is_count(size):
        return f"size must be a non-negative integer, got {size!r}"
    if not _is_count(chunk_size) or not 0 < chunk_size <= MAX_CHUNK_SIZE:
        return f"chunk_size must be an integer in 1..{MAX_CHUNK_SIZE}, got {chunk_size!r}"
    if not is_root(sha256):
        return f"sha256 must be 64 lowercase hex digits, got {sha256!r}"
    expected = -(-size // chunk_size)
    if len(chunks) != expected:
        return f"{size} bytes in chunks of {chunk_size} make {expected} chunks, not {len(chunks)}"
    for index, digest in enumerate(chunks):
        if not is_root(digest):
            return f"chunk {index}'s sha256 must be 64 lowercase hex digits, got {digest!r}"
    return None


class ManifestBuilder:
    """Hashes bytes fed in any block sizes into chunk hashes and the whole file's sha256."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}, got {chunk_size}")
        self.chunk_size = chunk_size
        self.size = 0
        self._whole = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._filled = 0
        self._chunks: list[str] = []

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        self._whole.update(view)
        self.size += len(view)
        while view:
            take = min(len(view), self.chunk_size - self._filled)
            self._chunk.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_size:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk, self._filled = hashlib.sha256(), 0

    def finish(self) -> BlobManifest:
        chunks = list(self._chunks)
        if self._filled:
            chunks.append(self._chunk.hexdigest())
        return BlobManifest(self.size, self.chunk_size, self._whole.hexdigest(), tuple(chunks))


@storage.retried
def manifest_of(url: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BlobManifest:
    """The manifest of a local file or fsspec URL, read once in blocks (a retry starts over)."""
    fs, path = storage.filesystem(str(url))
    builder = ManifestBuilder(chunk_size)
    with fs.open(path, "rb") as handle:
        while block := handle.read(READ_BLOCK):
            builder.update(block)
    return builder.finish()
