"""Reachability through Circuit Relay v2, between roster peers only.

A peer with `mesh.relay_service` relays for roster peers (HOP). A peer with `mesh.relays`
keeps a reservation on each of those relays, so that peers which cannot dial it (it sits
behind a NAT) reach it at `RELAY/p2p-circuit/p2p/SELF`; every daemon can dial such an
address. What py-libp2p 0.8.1 needs for this:

- the STOP side is left to CircuitV2Protocol: CircuitV2Transport's listener calls
  NetStream.get_remote_peer_id, which does not exist;
- /p2p-circuit addresses are dialled with CircuitV2Transport.dial: the swarm drops them
  from host.connect;
- the relay's default limits (4 reservations, 8 circuits per peer, every circuit cut after
  an hour, 1 GiB per circuit) are replaced by ones fit for a private mesh;
- its reservation refresher gives up after one failed refresh and never notices a relay
  that restarted, so reservations are kept here instead;
- the swarm refuses for 60 s to dial a peer whose addresses all failed once (its negative
  cache), so a relay back from a restart would wait out that minute: each attempt here,
  and each dial a client asks for, clears it for the peers it dials.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import trio
from libp2p.abc import IHost, INetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr
from multiaddr.protocols import P_P2P_CIRCUIT

from orchestrator.mesh.roster import RosterGate
from orchestrator.mesh.secure_channel import admit_stream
from orchestrator.mesh.wire import describe
from orchestrator.state.config import MeshConfig

logger = logging.getLogger(__name__)

# Only roster peers get in, so the caps guard against mistakes, not strangers. py-libp2p
# reads duration 0 as no cap, but data 0 as no byte allowed (its per-reservation
# fallback), hence a data cap no transfer reaches.
RELAY_LIMITS = RelayLimits(duration=0, data=1 << 62, max_circuit_conns=256,
                           max_reservations=1024)
RESERVE_TIMEOUT = 20.0     # one reservation attempt: connect, RESERVE, its answer
RENEW_MARGIN = 60.0        # renew this long before the relay's expiry
CHECK_EVERY = 2.0          # how often a held reservation's connection is checked
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # after failed attempts; the last repeats


class RelayRefused(ConnectionError):
    """The relay answered a reservation with a status other than OK."""


def is_circuit(address: Multiaddr) -> bool:
    return any(p.code == P_P2P_CIRCUIT for p in address.protocols())


class RosterCircuit(CircuitV2Protocol):
    """CircuitV2Protocol whose HOP and STOP handlers serve roster peers only: the roster
    is checked on every stream (as `guarded` does), a peer reserves for itself only, and a
    circuit is opened only towards a peer on the roster."""

    def __init__(self, host: IHost, gate: RosterGate, allow_hop: bool) -> None:
        super().__init__(host, limits=RELAY_LIMITS, allow_hop=allow_hop)
        self.gate = gate

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        if await admit_stream(stream, self.gate):
            await super()._handle_hop_stream(stream)

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        if await admit_stream(stream, self.gate):
            await super()._handle_stop_stream(stream)

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        # py-libp2p reserves for the peer the message names, which may not be the sender.
        sender = stream.muxed_conn.peer_id
        if msg.HasField("peer") and msg.peer.id and ID(msg.peer.id) != sender:
            await self._send_status(stream, StatusCode.PERMISSION_DENIED,
                                    "a peer reserves for itself only")
            return
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        if not self.gate.admits(ID(msg.peer.id), "relay connect target"):
            await self._send_status(stream, StatusCode.PERMISSION_DENIED,
                                    "the target is not on the roster")
            return
        await super()._handle_connect(stream, msg)


class Reachability:
    """The relay side of one daemon: HOP when `relay_service`, reservations on `relays`,
    and dialing of any address, /p2p-circuit ones included."""

    def __init__(self, host: IHost, gate: RosterGate, mesh: MeshConfig) -> None:
        self.host = host
        self.relays = [Multiaddr(address) for address in mesh.relays]
        self.protocol = RosterCircuit(host, gate, allow_hop=mesh.relay_service)
        # No CLIENT role: dialing through a relay must not take a reservation there.
        self.transport = CircuitV2Transport(host, self.protocol,
                                            RelayConfig(roles=RelayRole.STOP))
        self.expiry: dict[str, float] = {}  # relay address -> when its reservation lapses

    def circuit_addresses(self) -> list[str]:
        """Where peers reach this one through a relay that holds its reservation now."""
        now = time.time()
        return [f"{relay}/p2p-circuit/p2p/{self.host.get_id()}"
                for relay, expires in self.expiry.items() if expires > now]

    async def dial(self, address: Multiaddr) -> ID:
        """Connect to the peer `address` names (ending in /p2p/ID); a /p2p-circuit address
        goes through its relay. The peer's ID."""
        if is_circuit(address):
            relay, peer = self.transport.parse_circuit_ma(address)
            self._forget_failures(info_from_p2p_addr(relay).peer_id, peer)
            await self.transport.dial(address)
            return peer
        info = info_from_p2p_addr(address)
        self._forget_failures(info.peer_id)
        await self.host.connect(info)
        return info.peer_id

    def _forget_failures(self, *peers: ID) -> None:
        """Take `peers` out of the swarm's negative cache: a dial asked for now is tried
        now, not refused for a failure up to a minute old."""
        network = self.host.get_network()
        if isinstance(network, Swarm):
            for peer in peers:
                network.unblock_peer(peer)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve HOP/STOP when this peer relays or is relayed, and keep a reservation on
        every relay; on entry, each relay has had its first attempt (bounded), so that
        the ready line lists the circuit addresses that already work."""
        if not (self.protocol.allow_hop or self.relays):
            yield
            return
        async with background_trio_service(self.protocol), trio.open_nursery() as nursery:
            await self.protocol.event_started.wait()
            first = [trio.Event() for _ in self.relays]
            for relay, tried in zip(self.relays, first, strict=True):
                nursery.start_soon(self._keep_reservation, relay, tried)
            for tried in first:
                await tried.wait()
            yield
            nursery.cancel_scope.cancel()

    async def _keep_reservation(self, relay: Multiaddr, tried: trio.Event) -> None:
        """Reserve on `relay`, renew before expiry, and reserve again as soon as the
        connection to it drops (a relay that restarted has forgotten us); failures are
        retried, ever more slowly."""
        info = info_from_p2p_addr(relay)
        failures = 0
        while True:
            try:
                with trio.fail_after(RESERVE_TIMEOUT):
                    expires = await self._reserve(info)
            except Exception as error:  # Cancelled is not an Exception: shutdown ends it
                self.expiry.pop(str(relay), None)
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                logger.warning("no reservation on relay %s (%s); retrying in %g s",
                               relay, describe(error), delay)
                tried.set()
                await trio.sleep(delay)
                continue
            failures = 0
            self.expiry[str(relay)] = expires
            tried.set()
            while (time.time() < expires - RENEW_MARGIN
                   and info.peer_id in self.host.get_connected_peers()):
                await trio.sleep(CHECK_EVERY)

    async def _reserve(self, relay: PeerInfo) -> float:
        """One RESERVE on a fresh stream to `relay`; when the reservation lapses."""
        self._forget_failures(relay.peer_id)
        await self.host.connect(relay)
        stream = await self.host.new_stream(relay.peer_id, [PROTOCOL_ID])
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
            answer = await read_delimited_msg(stream, HopMessage)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()
        status = StatusCode(answer.status) if answer.HasField("status") else None
        if status != StatusCode.OK or not answer.HasField("reservation"):
            raise RelayRefused(f"relay {relay.peer_id} refused the reservation "
                               f"({status.name if status else 'no status'})")
        return float(answer.reservation.expire)
