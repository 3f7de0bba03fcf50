"""The daemons' wire protocols over libp2p streams, one request and one reply per stream:

- `/islands/request/1`: {"protocol", "timeout"} + payload -> {"ok"} + payload or {"error"};
  the application protocol travels inside the frame, so one guarded handler serves all.
- `/islands/blob/1`: {"op": "manifest", "root"} -> the manifest JSON, or {"unknown": true};
  {"op": "read", "root", "offset", "length"} -> the bytes, at most one chunk, or {"error"};
  {"op": "ticket"} -> a ticket for the bulk channel (`bulk_server.py`), or {"error"}.

Every wait is bounded; a dropped stream is retried once (so a request may arrive twice, never
zero times without the caller hearing of it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from orchestrator.mesh.blob_manifest import is_root
from orchestrator.mesh.blob_store import BlobStore
from orchestrator.mesh.framing import Header, encode, read_frame

REQUEST_PROTOCOL = TProtocol("/islands/request/1")
BLOB_PROTOCOL = TProtocol("/islands/blob/1")
# How long a served stream may take to deliver its request frame.
RECEIVE_TIMEOUT = 30.0


class RemoteError(Exception):
    """The peer answered with a refusal; not retried."""


def describe(error: BaseException) -> str:
    """One line for an error, a trio ExceptionGroup or libp2p's MultiError included."""
    parts: list[str] = []
    stack = [error]
    while stack and len(parts) < 8:
        current = stack.pop()
        inner = [e for attribute in ("exceptions", "errors")
                 for e in getattr(current, attribute, ()) or () if isinstance(e, BaseException)]
        if not inner or str(current):
            parts.append(f"{type(current).__name__}: {current}".rstrip(": "))
        stack.extend(inner)
        if current.__cause__ is not None:
            stack.append(current.__cause__)
    return " <- ".join(parts)


def stream_reader(stream: INetStream) -> Callable[[int], Awaitable[bytes]]:
    """read(n) for `read_frame`: b"" at the end instead of StreamEOF."""

    async def read(n: int) -> bytes:
        try:
            return await stream.read(n)
        except StreamEOF:
            return b""

    return read


async def receive(stream: INetStream) -> tuple[Header, bytes] | None:
    with trio.move_on_after(RECEIVE_TIMEOUT):
        return await read_frame(stream_reader(stream))
    return None


async def reply(stream: INetStream, header: Header, payload: bytes = b"") -> None:
    """Write the one reply and half-close; a peer that went away is not our error."""
    with contextlib.suppress(Exception), trio.move_on_after(RECEIVE_TIMEOUT):
        await stream.write(encode(header, payload))
        await stream.close()


async def call_peer(host: IHost, peer: ID, protocol: TProtocol, header: Header,
                    payload: bytes, timeout: float) -> tuple[Header, bytes]:
    """One request on a new stream and its reply, within `timeout` in all; retried once on
    a dropped stream or connection. Raises RemoteError for a refusal, trio.TooSlowError."""
    with trio.fail_after(timeout):
        for attempt in (1, 2):
            try:
                return await _exchange(host, peer, protocol, header, payload)
            except RemoteError:
                raise
            except Exception:
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


async def _exchange(host: IHost, peer: ID, protocol: TProtocol, header: Header,
                    payload: bytes) -> tuple[Header, bytes]:
    stream = await host.new_stream(peer, [protocol])
    try:
        await stream.write(encode(header, payload))
        frame = await read_frame(stream_reader(stream))
    finally:
        with contextlib.suppress(Exception):
            await stream.close()
    if frame is None:
        raise ConnectionError("the stream closed without a reply")
    if "error" in frame[0]:
        raise RemoteError(str(frame[0]["error"]))
    return frame


def peer_hosts(host: IHost, peer: ID, most: int = 4) -> list[str]:
    """IPs `peer` may be reached at, best first: those of our direct connections to it,
    then those of its addresses we know (from a dial, or from identify). Relayed
    connections and unspecified addresses give none."""
    hosts: list[str] = []
    for conn in host.get_network().get_connections(peer):
        with contextlib.suppress(Exception):
            if "p2p-circuit" not in " ".join(map(str, conn.get_transport_addresses())):
                address = conn.muxed_conn.get_remote_address()
                if address:
                    hosts.append(str(address[0]))
    with contextlib.suppress(Exception):
        for address in host.get_peerstore().addrs(peer):
            parts = str(address).strip("/").split("/")
            if "p2p-circuit" not in parts and len(parts) >= 2 and parts[0] in ("ip4", "ip6") \
                    and parts[1] not in ("0.0.0.0", "::"):
                hosts.append(parts[1])
    return list(dict.fromkeys(hosts))[:most]


def blob_handler(store: BlobStore, tickets: Callable[[ID], Header] | None = None
                 ) -> Callable[[INetStream], Awaitable[None]]:
    """Serve manifests and chunk-bounded ranges of the blobs in `store`, and bulk-channel
    tickets when `tickets` issues them (`bulk_server.BulkServer.issue`)."""

    async def handle(stream: INetStream) -> None:
        frame = await receive(stream)
        if frame is None:
            await stream.reset()
            return
        header = frame[0]
        if header.get("op") == "ticket":
            if tickets is None:
                await reply(stream, {"error": "this peer offers no bulk channel"})
            else:
                await reply(stream, {"ok": True, **tickets(stream.muxed_conn.peer_id)})
            return
        root = header.get("root")
        try:
            manifest = await trio.to_thread.run_sync(store.manifest, root) if is_root(root) \
                else None
        except Exception as error:  # a corrupt manifest in our own store
            await reply(stream, {"error": f"manifest of {root}: {describe(error)}"})
            return
        if header.get("op") == "manifest":
            if manifest is None:
                await reply(stream, {"unknown": True})
            else:
                await reply(stream, {"ok": True}, manifest.to_json().encode())
            return
        if header.get("op") != "read":
            await reply(stream, {"error": f"unknown blob operation {header.get('op')!r}"})
            return
        if manifest is None:
            await reply(stream, {"error": f"unknown blob {root}"})
            return
        offset, length = header.get("offset"), header.get("length")
        if refusal := manifest.range_refusal(offset, length):
            await reply(stream, {"error": refusal})
            return
        try:
            data = await trio.to_thread.run_sync(store.read, root, offset, length)
        except Exception as error:
            await reply(stream, {"error": f"read of {root}: {describe(error)}"})
            return
        await reply(stream, {"ok": True}, data)

    return handle
