"""The mesh's identity and roster: key files, `islands mesh id`, and who gets in.

Peers run as separate OS processes on 127.0.0.1 (tests/mesh_peer.py). The listeners start
once for the module, then every dialer runs at the same time (each process spends most of
its start importing libp2p); each test then checks its own scenario's outcome.
"""

from __future__ import annotations

import json
import os
import queue
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.mesh.identity import load_identity
from orchestrator.mesh.roster import Roster, RosterGate, roster_from_config
from orchestrator.state.config import parse_config
from orchestrator.state.manifest import Manifest
from orchestrator.state.run_config import layout_for, refuse_changed_config
from runstore import storage
from runstore.errors import InputError

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("mesh_peer.py")
# Bounds for a loaded 2-core machine, where one process can take many seconds to import
# libp2p; nothing here asserts on durations.
START_TIMEOUT = 180.0
DIAL_TIMEOUT = 60.0


@dataclass
class Peer:
    """A mesh_peer.py process and the JSON lines it printed."""

    name: str
    process: subprocess.Popen
    log: Path
    lines: queue.Queue = field(default_factory=queue.Queue)
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, folder: Path, *args: str) -> Peer:
        log = folder / f"{name}.stderr"
        with log.open("wb") as stderr:
            process = subprocess.Popen([sys.executable, str(HELPER), *args], cwd=REPO,
                                       stdout=subprocess.PIPE, stderr=stderr, text=True)
        peer = cls(name, process, log)
        threading.Thread(target=peer._read, daemon=True).start()
        return peer

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)  # the process closed its output

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events if e["event"] == event]
            if found:
                return found[0]
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                line = None
                left = 0
            if line is None and (left <= 0 or self.process.poll() is not None):
                raise AssertionError(f"{self.name}: no {event!r} event within {timeout:.0f} s; "
                                     f"events {self.events}; stderr: {self.stderr()[-2000:]}")
            if line is not None:
                self.events.append(line)

    def drain(self) -> list[dict[str, Any]]:
        """Every event printed so far."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return self.events
            if line is not None:
                self.events.append(line)

    def streams(self) -> list[dict[str, Any]]:
        return [e for e in self.drain() if e["event"] == "stream"]

    def refusals(self) -> list[dict[str, Any]]:
        return [e for e in self.drain() if e["event"] == "refused"]

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@dataclass
class Mesh:
    ids: dict[str, str]
    keys: dict[str, Path]
    listeners: dict[str, Peer]
    dialers: dict[str, Peer]
    outcomes: dict[str, dict[str, Any]]


def key(folder: Path, name: str) -> tuple[Path, str]:
    path = folder / f"{name}.key"
    return path, str(load_identity(path).peer_id)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Mesh:
    folder = tmp_path_factory.mktemp("mesh")
    keys, ids = {}, {}
    # a, b: the roster; c: off it; d, p, n: impostors' own keys; e: a default host; r, g:
    # hosts of the roster-change and network-key scenarios.
    for name in "abcdpeng":
        keys[name], ids[name] = key(folder, name)
    network_key, other_network_key = folder / "network.key", folder / "other-network.key"
    for path, digit in ((network_key, "7"), (other_network_key, "8")):
        path.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{digit * 64}\n")
        path.chmod(0o600)
    a, b, c, d, g, n = (ids[x] for x in "abcdgn")
    peers: list[Peer] = []
    try:
        listeners = {
            "a": ("--key", keys["a"], "--roster", a, b),
            # c would admit a, so when a dials c only a's own roster refuses.
            "c": ("--key", keys["c"], "--roster", a, c),
            # d is not b: an address that says /p2p/<b> but leads to d.
            "d": ("--key", keys["d"], "--roster", a, b, d),
            "default": ("--key", keys["e"], "--security", "default"),
            "drop": ("--key", keys["g"], "--roster", b, g, "--drop-after-first"),
            "network": ("--key", keys["n"], "--roster", b, n, "--network-key", network_key),
        }
        started = {name: Peer.start(name, folder, *map(str, args), "--listen")
                   for name, args in listeners.items()}
        peers += started.values()
        addr = {name: peer.wait_for("listening", START_TIMEOUT)["addr"]
                for name, peer in started.items()}
        port_of_d = addr["d"].split("/p2p/")[0]
        dialers = {
            "b-to-a": ("--key", keys["b"], "--roster", a, b, "--dial", addr["a"]),
            "c-to-a": ("--key", keys["c"], "--roster", a, c, "--dial", addr["a"]),
            "a-to-c": ("--key", keys["a"], "--roster", a, b, "--dial", addr["c"]),
            "plaintext-as-b-to-a": ("--key", keys["p"], "--claim", keys["b"],
                                    "--security", "plaintext", "--dial", addr["a"]),
            "plaintext-as-b-to-default": ("--key", keys["p"], "--claim", keys["b"],
                                          "--security", "plaintext", "--dial", addr["default"]),
            "noise-as-b-to-a": ("--key", keys["p"], "--claim", keys["b"], "--roster", a,
                                "--dial", addr["a"]),
            "a-to-d-as-b": ("--key", keys["a"], "--roster", a, b,
                            "--dial", f"{port_of_d}/p2p/{b}"),
            "b-twice-to-drop": ("--key", keys["b"], "--roster", b, g, "--streams", "2",
                                "--dial", addr["drop"]),
            "b-to-network": ("--key", keys["b"], "--roster", b, n,
                             "--network-key", network_key, "--dial", addr["network"]),
            # A wrong network key garbles the handshake until the dial times out.
            "b-wrong-key-to-network": ("--key", keys["b"], "--roster", b, n, "--timeout", "6",
                                       "--network-key", other_network_key,
                                       "--dial", addr["network"]),
        }
        running = {name: Peer.start(name, folder, *map(str, args), "--message", name)
                   for name, args in dialers.items()}
        peers += running.values()
        outcomes = {name: peer.wait_for("dialed", START_TIMEOUT + DIAL_TIMEOUT)
                    for name, peer in running.items()}
        yield Mesh(ids, keys, started, running, outcomes)
    finally:
        for peer in peers:
            peer.stop()


def served(listener: Peer, message: str) -> list[dict[str, Any]]:
    return [e for e in listener.streams() if e["message"] == message]


# Identity


def test_key_file_is_created_owner_only_and_keeps_its_peer_id(tmp_path, mesh):
    path = tmp_path / "new" / "mesh.key"
    previous = os.umask(0)  # even a permissive umask must not widen the file
    try:
        first = load_identity(path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    content = path.read_bytes()
    assert load_identity(path).peer_id == first.peer_id
    assert path.read_bytes() == content
    assert str(first.peer_id).startswith("12D3KooW")  # Ed25519, inlined in the ID
    # Another process that loaded a's key announced the ID this process derives from it.
    assert mesh.listeners["a"].wait_for("listening", 1)["peer_id"] == mesh.ids["a"]
    assert str(load_identity(mesh.keys["a"]).peer_id) == mesh.ids["a"]


def test_key_file_readable_by_others_or_garbled_is_refused(tmp_path):
    path = tmp_path / "mesh.key"
    load_identity(path)
    path.chmod(0o644)
    with pytest.raises(InputError) as refused:
        load_identity(path)
    assert refused.value.where == str(path)
    assert "0644" in refused.value.problem and "0600" in refused.value.problem
    garbled = tmp_path / "garbled.key"
    garbled.write_bytes(b"\x08\x01\x12\x05short")
    garbled.chmod(0o600)
    with pytest.raises(InputError, match="expected an Ed25519 private key"):
        load_identity(garbled)


# Who gets in


def test_two_roster_peers_exchange_a_message(mesh):
    assert mesh.outcomes["b-to-a"]["ok"], mesh.outcomes["b-to-a"]
    assert mesh.outcomes["b-to-a"]["replies"] == ["echo:b-to-a"]
    assert [e["peer"] for e in served(mesh.listeners["a"], "b-to-a")] == [mesh.ids["b"]]


def test_noise_peer_off_the_roster_is_refused_when_it_dials_us(mesh):
    assert not mesh.outcomes["c-to-a"]["ok"]
    refusals = [e for e in mesh.listeners["a"].refusals() if e["peer"] == mesh.ids["c"]]
    assert refusals and {e["where"] for e in refusals} == {"inbound handshake"}
    assert not served(mesh.listeners["a"], "c-to-a")


def test_noise_peer_off_the_roster_is_refused_when_we_dial_it(mesh):
    outcome, dialer = mesh.outcomes["a-to-c"], mesh.dialers["a-to-c"]
    assert not outcome["ok"]
    # c has a on its roster: the refusal is a's own, right after the handshake.
    assert {(e["peer"], e["where"]) for e in dialer.refusals()} == {
        (mesh.ids["c"], "outbound handshake")}
    assert not served(mesh.listeners["c"], "a-to-c")
    assert not mesh.listeners["c"].refusals()


def test_plaintext_peer_claiming_a_roster_id_is_refused(mesh):
    # The attack is real: py-libp2p's default host takes the impostor for b ...
    control = mesh.outcomes["plaintext-as-b-to-default"]
    assert control["ok"], control
    assert [e["peer"] for e in served(mesh.listeners["default"],
                                      "plaintext-as-b-to-default")] == [mesh.ids["b"]]
    # ... the mesh host offers no plaintext, so it never gets that far.
    assert not mesh.outcomes["plaintext-as-b-to-a"]["ok"]
    assert not served(mesh.listeners["a"], "plaintext-as-b-to-a")


def test_noise_peer_claiming_a_roster_id_without_its_key_is_refused(mesh):
    # It presents b's public key but cannot sign with b's private key.
    assert not mesh.outcomes["noise-as-b-to-a"]["ok"]
    assert not served(mesh.listeners["a"], "noise-as-b-to-a")
    # Noise refused it (a bad signature), before the roster gate, which admits b, saw it.
    assert not [e for e in mesh.listeners["a"].refusals() if e["peer"] == mesh.ids["b"]]


def test_address_claiming_a_roster_id_for_another_key_is_refused(mesh):
    # We dial /…/p2p/<b> and d answers: Noise proves d's key, which is not b's.
    outcome = mesh.outcomes["a-to-d-as-b"]
    assert not outcome["ok"]
    assert "PeerIDMismatchesPubkey" in outcome["error"]
    # Noise itself failed: the roster gate (which would refuse d too) never saw a peer.
    assert not mesh.dialers["a-to-d-as-b"].refusals()
    assert not served(mesh.listeners["d"], "a-to-d-as-b")


def test_stream_handlers_recheck_the_roster(mesh):
    # After the first stream the listener installs a newer roster without b: b's
    # connection is still open, but its next stream is refused by the handler guard.
    outcome = mesh.outcomes["b-twice-to-drop"]
    assert outcome["replies"] == ["echo:b-twice-to-drop"]
    assert not outcome["ok"]
    listener = mesh.listeners["drop"]
    assert len(served(listener, "b-twice-to-drop")) == 1
    assert listener.wait_for("roster", 5)["epoch"] == 1
    assert any(e["peer"] == mesh.ids["b"] and e["where"].startswith("stream")
               for e in listener.refusals())


def test_network_key_must_match(mesh):
    assert mesh.outcomes["b-to-network"]["ok"], mesh.outcomes["b-to-network"]
    assert mesh.outcomes["b-to-network"]["replies"] == ["echo:b-to-network"]
    assert not mesh.outcomes["b-wrong-key-to-network"]["ok"]
    assert not served(mesh.listeners["network"], "b-wrong-key-to-network")


# Roster and config


def test_roster_comes_from_the_config_and_an_older_epoch_cannot_replace_it(tmp_path):
    peer = str(load_identity(tmp_path / "k").peer_id)
    config = parse_config({"run": "r", "mesh": {"roster": [peer], "roster_epoch": 2}})
    gate = RosterGate(roster_from_config(config.mesh))
    assert [str(p) for p in gate.roster.peers] == [peer] and gate.roster.epoch == 2
    with pytest.raises(InputError, match="older"):
        gate.replace(Roster.of([], epoch=1))
    assert gate.admits(next(iter(gate.roster.peers)), "test")
    gate.replace(Roster.of([], epoch=3))
    assert not gate.admits(next(iter(roster_from_config(config.mesh).peers)), "test")


def test_config_names_a_bad_peer_id_in_the_roster():
    with pytest.raises(InputError) as refused:
        parse_config({"run": "r", "mesh": {"roster": ["12D3KooWnotapeerid"]}})
    assert "mesh.roster.0" in str(refused.value) and "peer ID" in str(refused.value)
    with pytest.raises(InputError, match=r"mesh\.listen\.0"):
        parse_config({"run": "r", "mesh": {"listen": ["/ip4/0.0.0.0/udp/4001/quic-v1"]}})


def test_config_names_a_bad_relay_address_or_a_relay_off_the_roster(tmp_path):
    peer = str(load_identity(tmp_path / "relay.key").peer_id)
    good = f"/ip4/198.51.100.7/tcp/4001/p2p/{peer}"
    mesh = parse_config({"run": "r", "mesh": {"roster": [peer], "relays": [good],
                                              "relay_service": True}}).mesh
    assert mesh.relays == (good,) and mesh.relay_service
    for bad in ("/ip4/198.51.100.7/tcp/4001",                    # no peer ID
                f"/ip4/198.51.100.7/udp/4001/quic-v1/p2p/{peer}",  # not TCP
                "/ip4/198.51.100.7/tcp/4001/p2p/12D3KooWnotapeerid"):
        with pytest.raises(InputError, match=r"mesh\.relays\.0: expected"):
            parse_config({"run": "r", "mesh": {"roster": [peer], "relays": [bad]}})
    with pytest.raises(InputError, match=rf"mesh\.relays: relay {peer} is not on mesh\.roster"):
        parse_config({"run": "r", "mesh": {"relays": [good]}})


def test_a_run_frozen_before_the_mesh_section_still_resumes(tmp_path):
    config = parse_config({"run": "old", "storage": str(tmp_path)})
    layout = layout_for(config)
    frozen = config.dump()
    del frozen["mesh"]
    storage.write_bytes(layout.config, yaml.safe_dump(frozen).encode())
    manifest = Manifest.open(layout, "old", config.clusters)
    manifest.finish_stage("partition", {})
    assert refuse_changed_config(config, layout)
    with_mesh = parse_config({"run": "old", "storage": str(tmp_path),
                              "mesh": {"roster_epoch": 4}})
    assert refuse_changed_config(with_mesh, layout)
    with pytest.raises(InputError, match="seed"):
        refuse_changed_config(parse_config({"run": "old", "storage": str(tmp_path),
                                            "seed": 1}), layout)


# islands mesh id


def test_mesh_id_prints_a_stable_peer_id(tmp_path):
    path = tmp_path / "id" / "mesh.key"
    runner = CliRunner()
    first = runner.invoke(app, ["mesh", "id", "--key", str(path),
                                "--listen", "/ip4/127.0.0.1/tcp/4001"])
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    peer_id = first.stdout.splitlines()[0]
    assert peer_id == str(load_identity(path).peer_id)
    assert f"listen /ip4/127.0.0.1/tcp/4001/p2p/{peer_id}" in first.stdout
    again = runner.invoke(app, ["mesh", "id", "--key", str(path)])
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[0] == peer_id
    assert f"listen /ip4/0.0.0.0/tcp/0/p2p/{peer_id}" in again.stdout
    secret = load_identity(path).key_pair.private_key.to_bytes()
    assert secret.hex() not in first.output + again.output


NO_LIBP2P = """
import sys
sys.modules["libp2p"] = None  # an environment without the mesh extra
from typer.testing import CliRunner
from orchestrator.cli.main import app, main
validate = CliRunner().invoke(app, ["validate", sys.argv[1]])
print("validate exit", validate.exit_code, flush=True)
sys.argv = ["islands", "mesh", "id", "--key", sys.argv[2]]
main()
"""


def test_mesh_id_without_libp2p_says_how_to_install_it(tmp_path):
    path = tmp_path / "mesh.key"
    done = subprocess.run([sys.executable, "-c", NO_LIBP2P,
                           str(REPO / "configs" / "quickstart-image.yaml"), str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "validate exit 0" in done.stdout  # the rest of the CLI works without libp2p
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert 'pip install -e ".[mesh]"' in lines[0]
    assert not path.exists()
