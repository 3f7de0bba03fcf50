"""The bulk channel's client (`bulk_server.py` has the protocol): a pool of sealed
connections to one peer, opened with one ticket, one read in flight on each."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from orchestrator.mesh.bulk_channel import SealedSocket, client_handshake
from orchestrator.mesh.framing import FrameError

CONNECT_SECONDS = 5.0


class BulkUnreachable(ConnectionError):
    """No address of the peer's bulk server could be reached or admitted us; the caller
    falls back to libp2p streams."""


class BulkReadError(ConnectionError):
    """A read on an open bulk connection failed: the connection broke or timed out."""


class BulkRefused(Exception):
    """The peer answered a read with a refusal (an unknown blob, a range out of bounds)."""


class BulkPeer:
    def __init__(self, ticket: dict[str, Any], observed_host: str | None,
                 io_seconds: float = 60.0) -> None:
        """`ticket`: the server's answer to op "ticket"; `observed_host`: the IP we reach
        the peer at over libp2p (tried after the addresses the peer announces)."""
        self.ticket_id = bytes.fromhex(str(ticket["ticket_id"]))
        self.secret = bytes.fromhex(str(ticket["secret"]))
        candidates = [_split(a) for a in ticket.get("announce", [])]
        if observed_host:
            candidates.append((observed_host, int(ticket["port"])))
        self.candidates = list(dict.fromkeys(candidates))
        self.io_seconds = io_seconds
        self.address: tuple[str, int] | None = None  # the one that worked
        self._idle: list[SealedSocket] = []
        self._lock = threading.Lock()

    def read(self, root: str, offset: int, length: int) -> bytearray:
        channel = self._take()
        try:
            channel.send_frame({"op": "read", "root": root, "offset": offset,
                                "length": length})
            frame = channel.receive_frame()
        except (OSError, FrameError) as error:
            channel.close()
            raise BulkReadError(f"bulk read {root}@{offset}: {type(error).__name__}: "
                                f"{error}") from None
        if frame is None:
            channel.close()
            raise BulkReadError(f"bulk read {root}@{offset}: the connection closed")
        with self._lock:
            self._idle.append(channel)
        if "error" in frame[0]:
            raise BulkRefused(str(frame[0]["error"]))
        return frame[1]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for channel in idle:
            with contextlib.suppress(OSError):
                channel.close()

    def _take(self) -> SealedSocket:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            address = self.address
        if address is not None:
            try:
                return self._open(address)
            except (OSError, FrameError) as error:
                raise BulkReadError(f"bulk connect {address[0]}:{address[1]}: "
                                    f"{type(error).__name__}: {error}") from None
        tried = []
        for candidate in self.candidates:
            try:
                channel = self._open(candidate)
            except (OSError, FrameError) as error:
                tried.append(f"{candidate[0]}:{candidate[1]}: {type(error).__name__}: {error}")
                continue
            self.address = candidate
            return channel
        raise BulkUnreachable("no bulk address reached: " + ("; ".join(tried) or "none known"))

    def _open(self, address: tuple[str, int]) -> SealedSocket:
        sock = socket.create_connection(address, timeout=CONNECT_SECONDS)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = client_handshake(sock, self.ticket_id, self.secret)
            sock.settimeout(self.io_seconds)
            return channel
        except BaseException:
            sock.close()
            raise


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
