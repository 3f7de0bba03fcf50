"""The bulk channel's client (`bulk_server.py` has the protocol): a few sealed connections
to one peer, opened with one ticket, reads pipelined on them."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections import deque
from typing import Any

from orchestrator.mesh.bulk_channel import (
    AdmissionRefused,
    SealedSocket,
    client_handshake,
    kernel_timeouts,
)
from orchestrator.mesh.framing import FrameError

CONNECT_SECONDS = 5.0


class BulkUnreachable(ConnectionError):
    """No address of the peer's bulk server could be reached; the caller falls back to
    libp2p streams."""


class BulkReadError(ConnectionError):
    """A read on an open bulk connection failed: the connection broke or timed out."""


class BulkRefused(Exception):
    """The peer answered a read with a refusal (an unknown blob, a range out of bounds)."""


class _Connection:
    """One sealed connection with requests pipelined on it: a reader sends its request at
    once, then reads its response when every earlier response on it has been read (the
    server answers in order), so the server always has the next request waiting."""

    def __init__(self, channel: SealedSocket) -> None:
        self.channel = channel
        self.send_lock = threading.Lock()
        self.turn = threading.Condition()
        self.waiting: deque[int] = deque()   # readers' tickets, in request order
        self.broken: str | None = None

    def exchange(self, ticket: int, request: dict[str, Any]) -> tuple[dict, bytearray]:
        try:
            with self.send_lock:   # the queue's order is the order the requests went out
                with self.turn:
                    self.waiting.append(ticket)
                if self.broken is None:
                    self.channel.send_frame(request)
            with self.turn:
                while self.waiting[0] != ticket and self.broken is None:
                    self.turn.wait()
            if self.broken is not None:
                raise ConnectionError(self.broken)
            frame = self.channel.receive_frame()
            if frame is None:
                raise ConnectionError("the connection closed")
            return frame
        except (OSError, FrameError) as error:
            self.fail(f"{type(error).__name__}: {error}")
            raise
        finally:
            with self.turn:
                if ticket in self.waiting:
                    self.waiting.remove(ticket)
                self.turn.notify_all()

    def fail(self, why: str) -> None:
        with self.turn:
            if self.broken is None:
                self.broken = why
                with contextlib.suppress(OSError):
                    self.channel.sock.shutdown(socket.SHUT_RDWR)
            self.turn.notify_all()


class BulkPeer:
    """Reads from one peer's bulk server: up to `connections` connections, each read on the
    least loaded one, pipelined, so a long round trip does not idle the link between two
    chunks. Safe to call from many threads."""

    def __init__(self, ticket: dict[str, Any], hosts: list[str], io_seconds: float = 60.0,
                 connections: int = 2) -> None:
        """`ticket`: the server's answer to op "ticket"; `hosts`: IPs the mesh knows the
        peer at (tried, on the ticket's port, after the addresses the peer announces)."""
        self.ticket_id = bytes.fromhex(str(ticket["ticket_id"]))
        self.secret = bytes.fromhex(str(ticket["secret"]))
        candidates = [_split(a) for a in ticket.get("announce", [])]
        candidates += [(host, int(ticket["port"])) for host in hosts]
        self.candidates = list(dict.fromkeys(candidates))
        self.io_seconds = io_seconds
        self.connections = max(1, connections)
        self.address: tuple[str, int] | None = None  # the one that worked
        self._open_connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._probe_lock = threading.Lock()   # one thread tries the candidates
        self._unreachable: str | None = None
        self._tickets = itertools.count()

    def read(self, root: str, offset: int, length: int) -> bytearray:
        connection = self._pick()
        request = {"op": "read", "root": root, "offset": offset, "length": length}
        try:
            header, payload = connection.exchange(next(self._tickets), request)
        except (OSError, FrameError) as error:
            self._drop(connection)
            raise BulkReadError(f"bulk read {root}@{offset}: {type(error).__name__}: "
                                f"{error}") from None
        if "error" in header:
            raise BulkRefused(str(header["error"]))
        return payload

    def close(self) -> None:
        with self._lock:
            connections, self._open_connections = self._open_connections, []
        for connection in connections:
            connection.fail("closed by this client")
            with contextlib.suppress(OSError):
                connection.channel.close()

    def _drop(self, connection: _Connection) -> None:
        with self._lock:
            if connection in self._open_connections:
                self._open_connections.remove(connection)
        connection.fail("dropped")
        with contextlib.suppress(OSError):
            connection.channel.close()

    def _pick(self) -> _Connection:
        """The least loaded connection; a new one while every one is busy and there are
        fewer than `connections`."""
        if (connection := self._least_loaded()) is not None:
            return connection
        with self._open_lock:   # one opens at a time; the others then find it
            if (connection := self._least_loaded()) is not None:
                return connection
            connection = _Connection(self._connect())
            with self._lock:
                self._open_connections.append(connection)
            return connection

    def _least_loaded(self) -> _Connection | None:
        """An idle connection, or the least loaded once there are `connections`."""
        with self._lock:
            live = [c for c in self._open_connections if c.broken is None]
            least = min(live, key=lambda c: len(c.waiting), default=None)
            if least is not None and (not least.waiting or len(live) >= self.connections):
                return least
            return None

    def _connect(self) -> SealedSocket:
        if self.address is not None:
            try:
                return self._open(self.address)
            except (OSError, FrameError) as error:
                raise BulkReadError(f"bulk connect {self.address[0]}:{self.address[1]}: "
                                    f"{type(error).__name__}: {error}") from None
        with self._probe_lock:
            if self.address is None and self._unreachable is None:
                return self._probe()
        if self.address is None:
            raise BulkUnreachable(self._unreachable or "no bulk address reached")
        return self._connect()

    def _probe(self) -> SealedSocket:
        tried = []
        for candidate in self.candidates:
            try:
                channel = self._open(candidate)
            except AdmissionRefused as error:
                # A server of ours answered (a restarted peer forgot its tickets): the
                # address is right; a new ticket is what is needed.
                self.address = candidate
                raise BulkReadError(f"bulk server {candidate[0]}:{candidate[1]} refused the "
                                    f"ticket: {error}") from None
            except (OSError, FrameError) as error:
                tried.append(f"{candidate[0]}:{candidate[1]}: {type(error).__name__}: {error}")
                continue
            self.address = candidate
            return channel
        self._unreachable = "no bulk address reached: " + ("; ".join(tried) or "none known")
        raise BulkUnreachable(self._unreachable)

    def _open(self, address: tuple[str, int]) -> SealedSocket:
        sock = socket.create_connection(address, timeout=CONNECT_SECONDS)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = client_handshake(sock, self.ticket_id, self.secret)
            kernel_timeouts(sock, self.io_seconds)
            return channel
        except BaseException:
            sock.close()
            raise


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
