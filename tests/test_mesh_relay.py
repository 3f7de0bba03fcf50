"""Circuit Relay v2 between mesh daemons, each its own process on 127.0.0.1: a relay
(`mesh.relay_service`), an island that names it in `mesh.relays`, a dialer given only the
island's /p2p-circuit address, and an outsider that the island and dialer admit but the
relay does not; last, the relay restarts and the island reserves again. Plus the relay's
own roster checks, driven by hand in one process. The same through a NAT:
tests/test_mesh_nat.py; the config's checks of `mesh.relays`: tests/test_mesh_identity.py."""

from __future__ import annotations

import time

import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from orchestrator.mesh.client import MeshClient, MeshError
from orchestrator.mesh.identity import load_identity
from orchestrator.mesh.relay import RosterCircuit
from orchestrator.mesh.roster import Roster, RosterGate
from orchestrator.mesh.secure_channel import new_mesh_host
from tests.mesh_daemons import ECHO, Daemon, running

NAMES = ("relay", "island", "dialer", "outsider")


@pytest.fixture(scope="module")
def relayed(tmp_path_factory) -> dict[str, Daemon]:
    folder = tmp_path_factory.mktemp("relayed")
    ids = {name: str(load_identity(folder / f"{name}.key").peer_id) for name in NAMES}
    roster = [ids["relay"], ids["island"], ids["dialer"]]
    relay = Daemon("relay", folder, roster, ids["relay"], relay_service=True)
    with running({"relay": relay}, ""):
        # The outsider admits everyone and names the relay too; only the relay refuses it.
        daemons = {"island": Daemon("island", folder, roster, ids["island"],
                                    relays=[relay.address]),
                   "dialer": Daemon("dialer", folder, roster, ids["dialer"]),
                   "outsider": Daemon("outsider", folder, [*roster, ids["outsider"]],
                                      ids["outsider"], relays=[relay.address])}
        with running(daemons, "") as started:
            yield {"relay": relay, **started}


def test_a_request_reaches_an_island_through_a_relay_given_only_its_circuit_address(relayed):
    relay, island, dialer = relayed["relay"], relayed["island"], relayed["dialer"]
    circuit = f"{relay.address}/p2p-circuit/p2p/{island.peer_id}"
    assert island.relay_addresses == [circuit]
    with MeshClient(island.socket) as fresh:  # every client's hello lists it too
        assert fresh.relay_addresses == [circuit]
    assert dialer.client.dial(circuit, timeout=30) == island.peer_id
    assert dialer.client.request(island.peer_id, ECHO, b"over the relay",
                                 timeout=30) == b"island:over the relay"
    assert island.served[-1].peer == dialer.peer_id
    # and back, on the same relayed connection
    assert island.client.request(dialer.peer_id, ECHO, b"back", timeout=30) == b"dialer:back"


def test_a_peer_off_the_relays_roster_can_neither_reserve_nor_connect(relayed):
    relay, island, outsider = relayed["relay"], relayed["island"], relayed["outsider"]
    assert outsider.relay_addresses == []
    assert "no reservation on relay" in outsider.log.read_text()
    with pytest.raises(MeshError):
        outsider.client.dial(f"{relay.address}/p2p-circuit/p2p/{island.peer_id}", timeout=15)
    assert island.peer_id not in outsider.client.peers()
    assert f"refused peer {outsider.peer_id}" in relay.log.read_text()


def test_an_island_reserves_again_on_a_relay_that_restarted(relayed):
    """Runs after the other relayed tests: it restarts the relay, which forgets every
    reservation; the island notices the dropped connection and reserves again."""
    relay, island, dialer = relayed["relay"], relayed["island"], relayed["dialer"]
    circuit = f"{relay.address}/p2p-circuit/p2p/{island.peer_id}"
    relay.kill()
    relay.client.close()
    assert wait_for_relay_addresses(island, []), "the island still lists a dead relay"
    relay.start()
    relay.wait_ready()
    assert wait_for_relay_addresses(island, [circuit]), "the island did not reserve again"
    assert dialer.client.dial(circuit, timeout=30) == island.peer_id
    assert dialer.client.request(island.peer_id, ECHO, b"after the restart",
                                 timeout=30) == b"island:after the restart"


def wait_for_relay_addresses(daemon: Daemon, expected: list[str], within: float = 60) -> bool:
    """True once a new client of `daemon` is greeted with `expected` relay addresses."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with MeshClient(daemon.socket) as client:
            if client.relay_addresses == expected:
                return True
        time.sleep(0.5)
    return False


def test_the_relay_refuses_a_reservation_for_another_peer_and_a_circuit_off_the_roster(
        tmp_path):
    """RosterCircuit's checks past the handshake, driven by a roster peer by hand."""
    relay_id, member_id, stranger_id = (load_identity(tmp_path / f"{name}.key")
                                        for name in ("relay", "member", "stranger"))
    gate = RosterGate(Roster.of([relay_id.peer_id, member_id.peer_id]))
    relay, member = new_mesh_host(relay_id, gate), new_mesh_host(member_id, gate)
    hop = RosterCircuit(relay, gate, allow_hop=True)
    answers: list[StatusCode] = []

    async def ask(message: HopMessage) -> None:
        stream = await member.new_stream(relay.get_id(), [PROTOCOL_ID])
        await write_delimited_msg(stream, message)
        answers.append(StatusCode((await read_delimited_msg(stream, HopMessage)).status))
        await stream.close()

    async def main() -> None:
        loopback = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
        async with (relay.run(loopback), member.run(loopback), background_trio_service(hop)):
            await hop.event_started.wait()
            address = Multiaddr(f"{relay.get_addrs()[0]}")
            if "/p2p/" not in str(address):
                address = address.encapsulate(Multiaddr(f"/p2p/{relay.get_id()}"))
            with trio.fail_after(30):
                await member.connect(info_from_p2p_addr(address))
                stranger = CircuitPeerId(id=stranger_id.peer_id.to_bytes())
                await ask(HopMessage(type=HopMessage.RESERVE, peer=stranger))
                await ask(HopMessage(type=HopMessage.CONNECT, peer=stranger))
                await ask(HopMessage(type=HopMessage.RESERVE))

    trio.run(main)
    assert answers == [StatusCode.PERMISSION_DENIED, StatusCode.PERMISSION_DENIED,
                       StatusCode.OK]

