"""Frames for the daemon's Unix socket and its wire protocols: a 4-byte big-endian length, a
JSON header, then `size` raw bytes (the payload). JSON and bytes only: a peer or a local
client never gets anything unpickled or evaluated."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.mesh.blob_manifest import MAX_CHUNK_SIZE

_LENGTH = struct.Struct(">I")
MAX_HEADER = 1 << 20
# A payload is at most one chunk (or one control message): a bound set by the reader, so a
# hostile length cannot size our buffers.
MAX_PAYLOAD = MAX_CHUNK_SIZE + (1 << 20)

Header = dict[str, Any]


class FrameError(ValueError):
    """Bytes that are not a frame: a garbled length, header or payload size."""


def encode(header: Header, payload: bytes = b"") -> bytes:
    return encode_header(header, len(payload)) + payload


def encode_header(header: Header, size: int) -> bytes:
    """The frame's bytes up to its payload of `size` bytes, for a payload sent on its own
    (no copy of a large payload into one buffer)."""
    data = json.dumps({**header, "size": size}).encode()
    return _LENGTH.pack(len(data)) + data


def _header(data: bytes) -> Header:
    try:
        header = json.loads(data)
    except ValueError:
        raise FrameError("a frame header is not JSON") from None
    size = header.get("size") if isinstance(header, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_PAYLOAD:
        raise FrameError(f"a frame header has no valid payload size: {str(header)[:200]}")
    return header


def _length(data: bytes) -> int:
    (length,) = _LENGTH.unpack(data)
    if length > MAX_HEADER:
        raise FrameError(f"a frame header of {length} bytes is over {MAX_HEADER}")
    return length


async def read_frame(read: Callable[[int], Awaitable[bytes]]) -> tuple[Header, bytes] | None:
    """The next frame, from `read(n)` (up to n bytes, b"" at the end); None when the stream
    ends before a frame starts, FrameError when it ends inside one."""

    async def exactly(n: int) -> bytes | None:
        parts, got = [], 0
        while got < n:
            part = await read(n - got)
            if not part:
                if got:
                    raise FrameError(f"the stream ended {got} bytes into {n}")
                return None
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    prefix = await exactly(_LENGTH.size)
    if prefix is None:
        return None
    header = _header(await _required(exactly(_length(prefix))))
    payload = await _required(exactly(header["size"])) if header["size"] else b""
    return header, payload


async def _required(data: Awaitable[bytes | None]) -> bytes:
    value = await data
    if value is None:
        raise FrameError("the stream ended inside a frame")
    return value


def recv_frame(sock: socket.socket) -> tuple[Header, bytes] | None:
    """`read_frame` for a blocking socket (an SSLSocket too). The payload is a bytearray,
    read in place: no copy of a large payload."""

    def exactly(n: int) -> bytearray | None:
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            count = sock.recv_into(view[got:])
            if not count:
                if got:
                    raise FrameError(f"the socket closed {got} bytes into {n}")
                return None
            got += count
        return buffer

    prefix = exactly(_LENGTH.size)
    if prefix is None:
        return None
    data = exactly(_length(bytes(prefix)))
    if data is None:
        raise FrameError("the socket closed inside a frame")
    header = _header(bytes(data))
    payload = exactly(header["size"]) if header["size"] else b""
    if payload is None:
        raise FrameError("the socket closed inside a frame")
    return header, payload
