"""The mesh daemon: the roster-enforcing libp2p host in a process of its own (a host that
shares a process with Python training loses most of its throughput to the GIL), serving
local clients (`client.MeshClient`) on a Unix socket of mode 0600.

    python -m orchestrator.mesh.daemon --config RUN.yaml --socket PATH --store URL

`--config` is a run config; its `mesh:` section gives the key, roster, listen addresses and
network key. `--store` is the fsspec URL of the blobs this peer serves. On start it prints one
JSON line {"event": "ready", "peer_id", "addresses", "socket"}; every client gets the same as
its first frame. Client frames carry an "id" and get one reply with that id; requests from
peers for a protocol a client serves are pushed to that client as {"op": "incoming"}, and
broadcast messages on a topic it subscribed to as {"op": "message"} (`gossip.py`).

Blob bytes (`bulk_server.py`): with `mesh.bulk.enabled` the daemon also serves its store's
blobs on a TCP port of their own to peers holding a ticket it issued over /islands/blob/1;
a client's `bulk_ticket` call fetches one from a peer, with the IPs this daemon knows the
peer at, and the client reads the bytes itself.

Reachability (`relay.py`): with `mesh.relay_service` the daemon relays for roster peers; with
`mesh.relays` it holds a reservation on each, and the ready line and hello add
"relay_addresses", the /p2p-circuit addresses that reach it through them. `dial` takes those.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from orchestrator.mesh.blob_store import FsspecBlobStore
from orchestrator.mesh.bulk_server import BulkServer
from orchestrator.mesh.framing import FrameError, Header, encode, read_frame
from orchestrator.mesh.gossip import GossipSettings, new_gossip
from orchestrator.mesh.gossip_service import GossipService
from orchestrator.mesh.relay import Reachability
from orchestrator.mesh.secure_channel import guarded, mesh_host_from_config
from orchestrator.mesh.wire import (
    BLOB_PROTOCOL,
    REQUEST_PROTOCOL,
    blob_handler,
    call_peer,
    describe,
    peer_hosts,
    receive,
    reply,
)
from orchestrator.state.config import load_config

logger = logging.getLogger(__name__)
# Bound on how long a served request waits for the local client's answer.
MAX_REQUEST_TIMEOUT = 600.0


class Session:
    """One connected local client; frames to it are written whole, one at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.lock = trio.Lock()
        self.nursery: trio.Nursery | None = None  # runs its subscriptions' deliveries

    async def send(self, header: Header, payload: bytes = b"") -> None:
        async with self.lock:
            await self.stream.send_all(encode(header, payload))

    async def read(self, n: int) -> bytes:
        return await self.stream.receive_some(n)


class Daemon:
    def __init__(self, host: IHost, socket_path: str, gossip: GossipService,
                 reach: Reachability) -> None:
        self.host = host
        self.reach = reach
        self.gossip = gossip
        self.socket_path = socket_path
        self.services: dict[str, Session] = {}
        # Served requests waiting for a local answer: rid -> (session, channel).
        self.waiting: dict[int, tuple[Session, trio.MemorySendChannel]] = {}
        self.rids = itertools.count(1)
        self.bulk_port: int | None = None

    def hello(self) -> dict[str, Any]:
        return {"peer_id": str(self.host.get_id()), "socket": self.socket_path,
                "addresses": [str(a) for a in self.host.get_addrs()],
                "relay_addresses": self.reach.circuit_addresses(),
                "bulk_port": self.bulk_port}

    async def serve_client(self, stream: trio.SocketStream) -> None:
        session = Session(stream)
        try:
            await session.send({"op": "hello", **self.hello()})
            async with trio.open_nursery() as nursery:
                session.nursery = nursery
                while (frame := await read_frame(session.read)) is not None:
                    nursery.start_soon(self.answer, session, *frame)
                nursery.cancel_scope.cancel()  # the client left: its calls are moot
        except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError) as error:
            logger.info("client left: %s", describe(error))
        finally:
            with contextlib.suppress(Exception):
                await self.gossip.unsubscribe_all(session.send)
            for protocol in [p for p, s in self.services.items() if s is session]:
                del self.services[protocol]
            for session_of, channel in list(self.waiting.values()):
                if session_of is session:
                    channel.send_nowait(({"error": "the serving client disconnected"}, b""))
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def answer(self, session: Session, header: Header, payload: bytes) -> None:
        """Run one client call and send its reply (an error becomes {"error": ...})."""
        call_id = header.get("id")
        try:
            result, data = await self.run_call(session, header, payload)
            reply_header = {"id": call_id, "ok": True, **result}
        except Exception as error:
            reply_header, data = {"id": call_id, "error": describe(error)}, b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await session.send(reply_header, data)

    async def run_call(self, session: Session, header: Header,
                       payload: bytes) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        timeout = min(float(header.get("timeout", 30.0)), MAX_REQUEST_TIMEOUT)
        if op == "dial":
            with trio.fail_after(timeout):
                peer = await self.reach.dial(Multiaddr(header["address"]))
            return {"peer_id": str(peer)}, b""
        if op == "peers":
            return {"peers": [str(p) for p in self.host.get_connected_peers()]}, b""
        if op == "serve":
            protocol = str(header["protocol"])
            if self.services.get(protocol, session) is not session:
                raise ValueError(f"protocol {protocol} is already served by another client")
            self.services[protocol] = session
            return {}, b""
        if op == "respond":
            entry = self.waiting.get(header.get("rid"))
            if entry is None:
                raise ValueError(f"request {header.get('rid')} is no longer waiting "
                                 "(timed out, or its peer went away)")
            answer = {"error": str(header["error"])} if "error" in header else {"ok": True}
            entry[1].send_nowait((answer, payload))
            return {}, b""
        if op == "request":
            peer = ID.from_base58(header["peer"])
            wire = {"protocol": str(header["protocol"]), "timeout": timeout}
            _, data = await call_peer(self.host, peer, REQUEST_PROTOCOL, wire, payload, timeout)
            return {}, data
        if op == "bulk_ticket":
            peer = ID.from_base58(header["peer"])
            ticket, _ = await call_peer(self.host, peer, BLOB_PROTOCOL, {"op": "ticket"}, b"",
                                        timeout)
            return {"ticket": ticket, "hosts": peer_hosts(self.host, peer)}, b""
        if op in ("manifest", "read"):
            peer = ID.from_base58(header["peer"])
            wire = {k: header[k] for k in ("op", "root", "offset", "length") if k in header}
            found, data = await call_peer(self.host, peer, BLOB_PROTOCOL, wire, b"", timeout)
            return {"unknown": bool(found.get("unknown"))}, data
        if op == "publish":
            return {"sent": await self.gossip.publish(str(header["topic"]), payload)}, b""
        if op == "subscribe":
            assert session.nursery is not None
            await self.gossip.subscribe(str(header["topic"]), session.send, session.nursery)
            return {}, b""
        if op == "topic_peers":
            return {"peers": self.gossip.topic_peers(str(header["topic"]))}, b""
        if op == "stats":
            return {"stats": self.gossip.stats()}, b""
        raise ValueError(f"unknown operation {op!r}")

    async def on_request(self, stream: INetStream) -> None:
        """/islands/request/1: hand the request to the local client serving its protocol and
        write back that client's answer."""
        frame = await receive(stream)
        if frame is None:
            await stream.reset()
            return
        header, payload = frame
        protocol = str(header.get("protocol"))
        session = self.services.get(protocol)
        if session is None:
            await reply(stream, {"error": f"peer {self.host.get_id()} serves no {protocol}"})
            return
        rid = next(self.rids)
        send, received = trio.open_memory_channel(1)
        self.waiting[rid] = (session, send)
        timeout = min(float(header.get("timeout", 30.0)), MAX_REQUEST_TIMEOUT)
        answer: tuple[Header, bytes] = ({"error": f"no answer from the client serving "
                                                  f"{protocol} in {timeout:g} s"}, b"")
        try:
            await session.send({"op": "incoming", "rid": rid, "protocol": protocol,
                                "peer": str(stream.muxed_conn.peer_id)}, payload)
            with trio.move_on_after(timeout):
                answer = await received.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            answer = ({"error": "the serving client disconnected"}, b"")
        finally:
            del self.waiting[rid]
        await reply(stream, *answer)


def open_unix_socket(path: str) -> trio.SocketListener:
    """Listen on `path` with mode 0600 from the start; a socket file left by a dead daemon
    is replaced, one a live daemon answers on is not."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise SystemExit(f"a mesh daemon already listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def run(config_path: str, socket_path: str, store_url: str) -> None:
    mesh = load_config(config_path).mesh
    host, gate, _ = mesh_host_from_config(mesh)
    settings = GossipSettings()
    pubsub, router, counters = new_gossip(host, gate, settings)
    reach = Reachability(host, gate, mesh)
    daemon = Daemon(host, socket_path, GossipService(pubsub, counters, settings), reach)
    store = FsspecBlobStore(store_url)
    bulk = BulkServer(store, gate, mesh.bulk.listen, mesh.bulk.announce) \
        if mesh.bulk.enabled else None
    daemon.bulk_port = bulk.port if bulk else None
    host.set_stream_handler(REQUEST_PROTOCOL, guarded(gate, daemon.on_request))
    host.set_stream_handler(BLOB_PROTOCOL, guarded(gate, blob_handler(
        store, bulk.issue if bulk else None)))
    listener = open_unix_socket(socket_path)
    try:
        async with (host.run(listen_addrs=[Multiaddr(a) for a in mesh.listen]),
                    background_trio_service(pubsub), background_trio_service(router),
                    reach.running()):
            await pubsub.wait_until_ready()
            print(json.dumps({"event": "ready", **daemon.hello()}), flush=True)
            await trio.serve_listeners(daemon.serve_client, [listener])
    finally:
        if bulk is not None:
            bulk.close()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.mesh.daemon",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config with a mesh: section")
    parser.add_argument("--socket", required=True, help="Unix socket for local clients")
    parser.add_argument("--store", required=True, help="fsspec URL of the blobs served")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(run, args.config, str(Path(args.socket).absolute()), args.store)


if __name__ == "__main__":
    main()
