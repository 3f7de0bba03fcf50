"""The bulk channel's client (`bulk_server.py` has the protocol): a pool of pinned TLS
connections to one peer, opened with one ticket, one read in flight on each."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Any

from orchestrator.mesh.bulk_tls import check_pin, client_context
from orchestrator.mesh.framing import FrameError, encode, recv_frame

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
        self.ticket = str(ticket["ticket"])
        self.fingerprint = str(ticket["fingerprint"])
        candidates = [_split(a) for a in ticket.get("announce", [])]
        if observed_host:
            candidates.append((observed_host, int(ticket["port"])))
        self.candidates = list(dict.fromkeys(candidates))
        self.io_seconds = io_seconds
        self.context = client_context()
        self.address: tuple[str, int] | None = None  # the one that worked
        self._idle: list[ssl.SSLSocket] = []
        self._lock = threading.Lock()

    def read(self, root: str, offset: int, length: int) -> bytearray:
        tls = self._take()
        try:
            tls.sendall(encode({"op": "read", "root": root, "offset": offset,
                                "length": length}))
            frame = recv_frame(tls)
        except (OSError, FrameError) as error:
            tls.close()
            raise BulkReadError(f"bulk read {root}@{offset}: {type(error).__name__}: "
                                f"{error}") from None
        if frame is None:
            tls.close()
            raise BulkReadError(f"bulk read {root}@{offset}: the connection closed")
        with self._lock:
            self._idle.append(tls)
        if "error" in frame[0]:
            raise BulkRefused(str(frame[0]["error"]))
        return frame[1] if isinstance(frame[1], bytearray) else bytearray(frame[1])

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for tls in idle:
            with contextlib.suppress(OSError):
                tls.close()

    def _take(self) -> ssl.SSLSocket:
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
                tls = self._open(candidate)
            except (OSError, FrameError) as error:
                tried.append(f"{candidate[0]}:{candidate[1]}: {type(error).__name__}: {error}")
                continue
            self.address = candidate
            return tls
        raise BulkUnreachable("no bulk address reached: " + ("; ".join(tried) or "none known"))

    def _open(self, address: tuple[str, int]) -> ssl.SSLSocket:
        raw = socket.create_connection(address, timeout=CONNECT_SECONDS)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.context.wrap_socket(raw)
        except (OSError, ssl.SSLError):
            raw.close()
            raise
        try:
            check_pin(tls, self.fingerprint)
            tls.sendall(encode({"ticket": self.ticket}))
            answer = recv_frame(tls)
            if answer is None or not answer[0].get("ok"):
                raise ConnectionRefusedError(answer[0].get("error") if answer
                                             else "closed before admitting us")
            tls.settimeout(self.io_seconds)
            return tls
        except BaseException:
            tls.close()
            raise


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
