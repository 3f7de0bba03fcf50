"""Decentralized runs: `islands run` as the coordinator (islands.launcher: mesh) and two
`islands island join` agents, each a separate process with its own storage folder, on
127.0.0.1, no Ray anywhere in them. The experts they train are bit-identical to the Ray
path's, and the run's router, eval and status work as on any run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from orchestrator.mesh.identity import load_identity
from orchestrator.pipeline import run_pipeline
from orchestrator.state.config import parse_config
from tests.conftest import REPO, tiny_config

RUN_SECONDS = 900.0
# Long enough to kill an island between two checkpoints of its expert.
EXPERTS = {"steps": 200, "checkpoint_every": 25}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@dataclass(frozen=True)
class Site:
    """Where a process runs: a network namespace (None: this one) and the IPv4 address its
    peer listens on there."""

    netns: str | None = None
    host: str = "127.0.0.1"


LOOPBACK = Site()


def islands(*args: str, log: Path, site: Site = LOOPBACK) -> subprocess.Popen:
    # `ip netns exec` execs the command, so the process is `islands` itself.
    prefix = ["ip", "netns", "exec", site.netns] if site.netns else []
    with log.open("ab") as out:
        return subprocess.Popen([*prefix, sys.executable, "-m", "orchestrator.cli.main", *args],
                                cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT)


def mesh_config(tmp_path: Path, names: list[str], port: int, speeds: bool = True,
                experts: dict = EXPERTS, host: str = "127.0.0.1",
                relays: Sequence[str] = ()) -> dict:
    """`speeds`: the pool gives each island's speed (else the coordinator measures them).
    The coordinator listens on host:port and holds a reservation on each of `relays` (each
    on its roster)."""
    ids = {name: str(load_identity(tmp_path / f"{name}.key").peer_id)
           for name in ["coordinator", *names]}
    roster = [ids[n] for n in names] + [a.rsplit("/p2p/", 1)[1] for a in relays]
    raw = tiny_config(str(tmp_path / "runs"), run="mesh-digits", experts=experts,
                      islands={"launcher": "mesh",
                               "pool": [{"name": n} | ({"speed": 1.0} if speeds else {})
                                        for n in names]},
                      mesh={"key": str(tmp_path / "coordinator.key"),
                            "listen": [f"/ip4/{host}/tcp/{port}"], "relays": list(relays),
                            "roster": roster, "heartbeat_seconds": 0.5,
                            "lease_seconds": 5.0, "join_seconds": 300.0,
                            "bulk": {"listen": f"/ip4/{host}/tcp/0"}})
    raw["coordinator_address"] = f"/ip4/{host}/tcp/{port}/p2p/{ids['coordinator']}"
    return raw


def ray_path_hashes(folder: Path, experts: dict = EXPERTS, until: str = "router") -> dict:
    """Trains the tiny config with `experts` on the embedded Ray (started by the caller's
    `ray_session`) up to the stage `until`: the sha256 of each expert's final weights (by
    expert), and the router's when it was trained."""
    config = parse_config(tiny_config(str(folder / "runs"), run="mesh-digits",
                                      experts=experts))
    manifest = run_pipeline(config, Console(file=open(os.devnull, "w")),  # noqa: SIM115
                            until=until)
    root = folder / "runs" / "mesh-digits"
    router = root / "router" / "model.safetensors"
    return {k: sha256(root / "experts" / f"expert-{k}" / "final" / "model.safetensors")
            for k in manifest.experts} | ({"router": sha256(router)} if router.exists() else {})


@pytest.fixture(scope="module")
def ray_experts(tmp_path_factory, ray_session):
    """The same tiny config trained on the embedded Ray: the hashes to match."""
    return ray_path_hashes(tmp_path_factory.mktemp("ray-path"))


class MeshRun:
    """A coordinator (`islands run`) and its island agents, each a process of its own. The
    coordinator runs at `site`, holding a reservation on each of `relays`; the agents of
    `joined` (default: every island) start at once on 127.0.0.1, others with `join`; the
    run stops after the stage `until`."""

    def __init__(self, tmp_path: Path, names: list[str], speeds: bool = True,
                 experts: dict = EXPERTS, site: Site = LOOPBACK, relays: Sequence[str] = (),
                 joined: list[str] | None = None, until: str = "eval") -> None:
        self.tmp_path, self.names = tmp_path, names
        raw = mesh_config(tmp_path, names, free_port(), speeds, experts, site.host, relays)
        self.coordinator = raw.pop("coordinator_address")
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        self.root = tmp_path / "runs" / "mesh-digits"
        self.driver_log = tmp_path / "driver.log"
        self.driver = islands("run", str(config_path), "--until", until, log=self.driver_log,
                              site=site)
        self.agents: dict[str, subprocess.Popen] = {}
        for name in names if joined is None else joined:
            self.join(name)

    def join(self, name: str, *extra: str, coordinator: str | None = None,
             site: Site = LOOPBACK) -> subprocess.Popen:
        """Start the agent of island `name` at `site`, given `coordinator` (default: the
        coordinator's own address)."""
        self.agents[name] = islands(
            "island", "join", "--coordinator", coordinator or self.coordinator,
            "--name", name, "--storage", str(self.tmp_path / name),
            "--key", str(self.tmp_path / f"{name}.key"),
            "--listen", f"/ip4/{site.host}/tcp/0", *extra,
            log=self.tmp_path / f"{name}.log", site=site)
        return self.agents[name]

    def manifest(self) -> dict:
        try:
            return json.loads((self.root / "manifest.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def finish(self) -> dict:
        try:
            self.driver.wait(RUN_SECONDS)
        finally:
            self.stop()
        log = self.driver_log.read_text()
        assert self.driver.returncode == 0, log[-3000:]
        return self.manifest()

    def stop(self) -> None:
        for process in [self.driver, *self.agents.values()]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [self.driver, *self.agents.values()]:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    def wait_for(self, what: str, ready: Callable[[dict], bool]) -> None:
        """Until `ready(manifest)` holds, the driver ends, or the run's time is up."""
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline and self.driver.poll() is None:
            if ready(self.manifest()):
                return
            time.sleep(0.2)
        raise AssertionError(f"never {what}: {self.driver_log.read_text()[-2000:]}")

    def checkpointed(self, expert: str) -> bool:
        """Whether the coordinator holds a complete checkpoint of the expert."""
        folder = self.root / "experts" / f"expert-{expert}" / "checkpoints"
        return bool(list(folder.glob("*/meta.json")))

    def weights(self, manifest: dict) -> dict[int, str]:
        return {int(k): sha256(self.root / "experts" / f"expert-{k}" / "final" /
                               "model.safetensors") for k in manifest["experts"]}


def test_a_coordinator_and_two_islands_train_the_ray_paths_experts(tmp_path, ray_experts):
    names = ["isl-a", "isl-b"]
    run = MeshRun(tmp_path, names, speeds=False)   # each island measures its speed
    # A peer off the coordinator's roster tries to join under a pool name: refused at the
    # handshake, it never gets in and gives up.
    load_identity(tmp_path / "intruder.key")
    intruder = islands("island", "join", "--coordinator", run.coordinator, "--name", "isl-a",
                       "--storage", str(tmp_path / "intruder"), "--key",
                       str(tmp_path / "intruder.key"), "--listen", "/ip4/127.0.0.1/tcp/0",
                       "--give-up-after", "20", log=tmp_path / "intruder.log")
    manifest = run.finish()
    assert intruder.wait(120) == 1, (tmp_path / "intruder.log").read_text()[-2000:]
    root = run.root
    assert run.weights(manifest) == {k: v for k, v in ray_experts.items() if k != "router"}
    assert sha256(root / "router" / "model.safetensors") == ray_experts["router"]
    assert {manifest["experts"][k]["island"] for k in manifest["experts"]} <= set(names)
    # The speeds the islands measured placed the experts, and are kept for a resume.
    measured = json.loads((root / "calibration.json").read_text())
    assert set(measured) == set(names) and all(m["samples_per_s"] > 0
                                               for m in measured.values())
    assert manifest["placement"]["speeds"] == {n: measured[n]["samples_per_s"] for n in names}
    for k in manifest["experts"]:   # checkpoints came back, as on the Ray path
        assert list((root / "experts" / f"expert-{k}" / "checkpoints").glob("*/meta.json"))
    # Each island holds its own copy of what it trained, and nothing of the router.
    for name in names:
        assert not list((tmp_path / name).rglob("router/model.safetensors"))


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_island_loses_its_expert_to_the_other_which_resumes_it_bit_identical(
        tmp_path, ray_experts, how):
    """Killed: its connection drops. Hung (SIGSTOP): its connection stays up, its heartbeats
    stop, and its lease lapses after mesh.lease_seconds; thawed, it is told its lease was
    revoked, and what it still sends under that lease is refused. The run stops after the
    experts: the router and eval are the first test's."""
    run = MeshRun(tmp_path, ["isl-a", "isl-b"], until="experts")
    try:
        victim, expert = None, None
        deadline = time.monotonic() + RUN_SECONDS
        while victim is None and time.monotonic() < deadline and run.driver.poll() is None:
            for k, entry in run.manifest().get("experts", {}).items():
                checkpoints = run.root / "experts" / f"expert-{k}" / "checkpoints"
                if entry.get("state") == "running" and list(checkpoints.glob("*/meta.json")):
                    victim, expert = entry["island"], int(k)
                    break
            time.sleep(0.2)
        assert victim is not None, "no expert reached a checkpoint on the coordinator"
        run.agents[victim].send_signal(how)
        if how == signal.SIGSTOP:   # thawed once its expert moved, while the run goes on
            deadline = time.monotonic() + RUN_SECONDS
            while (len(run.manifest().get("experts", {}).get(str(expert), {}).get(
                    "attempts", [])) < 2
                   and time.monotonic() < deadline and run.driver.poll() is None):
                time.sleep(0.2)
            run.agents[victim].send_signal(signal.SIGCONT)
            # Its next heartbeat hears the lease was revoked, or its next push is refused
            # as superseded: either way it stops the attempt and its late work is refused.
            log, told = tmp_path / f"{victim}.log", ("revoked", "superseded")
            deadline = time.monotonic() + 60
            while not any(word in log.read_text() for word in told) \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert any(word in log.read_text() for word in told), log.read_text()[-2000:]
        manifest = run.finish()
    finally:
        for agent in run.agents.values():
            if agent.poll() is None:
                agent.send_signal(signal.SIGCONT)
        run.stop()
    attempts = manifest["experts"][str(expert)]["attempts"]
    assert len(attempts) == 2 and "island" in attempts[0]["reason"], attempts
    survivor = ({"isl-a", "isl-b"} - {victim}).pop()
    assert attempts[1]["island"] == survivor and attempts[1]["resumed_from"] >= 25
    assert run.weights(manifest) == {k: v for k, v in ray_experts.items() if k != "router"}
    # What the kill cost: the steps past the newest checkpoint the coordinator held (one
    # interval, plus a checkpoint still on its way over the mesh).
    assert attempts[0]["step"] - attempts[1]["resumed_from"] <= 2 * EXPERTS["checkpoint_every"]


def test_a_killed_coordinator_resumed_takes_back_the_islands_leases_bit_identical(
        tmp_path, ray_experts):
    """The driver is SIGKILLed while both islands train. They train on alone, queueing their
    checkpoints, and retry it; `islands resume` reloads the manifest and the leases, the
    islands join again and report their tokens, and each attempt is carried over under the
    same lease: no expert is trained again from a checkpoint, and the weights are the Ray
    path's."""
    run = MeshRun(tmp_path, ["isl-a", "isl-b"])
    try:
        run.wait_for("both experts running, one with a checkpoint back", lambda m: (
            all(e.get("state") == "running" for e in m.get("experts", {}).values())
            and len(m.get("experts", {})) == 2
            and any(run.checkpointed(k) for k in m["experts"])))
        run.driver.send_signal(signal.SIGKILL)
        run.driver.wait(30)
        killed = run.manifest()
        time.sleep(3)   # the islands go on alone
        run.driver_log = tmp_path / "resume.log"
        run.driver = islands("resume", str(run.root), log=run.driver_log)
        manifest = run.finish()
    finally:
        run.stop()
    assert run.weights(manifest) == {k: v for k, v in ray_experts.items() if k != "router"}
    for k, entry in manifest["experts"].items():
        first, second = entry["attempts"]
        assert first["reason"] == "driver stopped during the attempt", entry
        assert second.get("carried_over") is True and second["island"] == first["island"]
        assert killed["experts"][k]["island"] == second["island"]
    assert "re-established" in run.driver_log.read_text()
    # Nothing trained twice: one training subprocess per expert, on its island.
    for name in run.names:
        log = (tmp_path / f"{name}.log").read_text()
        trained = [k for k, e in manifest["experts"].items() if e["island"] == name]
        assert log.count("training (pid") == len(trained), log[-3000:]
