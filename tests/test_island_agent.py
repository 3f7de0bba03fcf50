"""The island agent against a small scripted coordinator: real processes on 127.0.0.1 (the
coordinator's daemon, the agent with its own daemon, its training subprocesses). One agent
serves the whole module; each test offers its own expert under its own token."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.control.expert_specs import expert_spec
from orchestrator.mesh.blob_store import FsspecBlobStore
from orchestrator.mesh.client import MeshClient, MeshError
from orchestrator.mesh.coordination import COORD_PROTOCOL, SUPERSEDED, FileRef, Offer
from orchestrator.mesh.identity import load_identity
from orchestrator.mesh.island_train import spec_from_dict
from orchestrator.pipeline import partition_request
from orchestrator.state.config import IslandSpec, parse_config
from partitioner.stage import run_partition
from runstore.errors import InputError
from runstore.layout import RunLayout
from tests.conftest import recipe, tiny_config
from tests.mesh_daemons import REPO, Daemon, running
from worker.train import ExpertSpec, train_expert

RUN = "island-test"
SHARD = "partition/shards/cluster={}/part-0.parquet"
WAIT = 240.0   # a loaded 2-core machine: daemon start, torch import, training


@dataclass
class FakeCoordinator:
    """Answers the protocol from a script: offers and revocations ride on the heartbeat's
    answer; artifacts are fetched from the island and checked, unless refused."""

    client: MeshClient
    socket: Path          # its daemon's, to come back after `away`
    fetched: Path
    messages: list[dict[str, Any]] = field(default_factory=list)
    offers: list[Offer] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    calibrate: list[Offer] = field(default_factory=list)  # sent once each
    refuse: dict[str, str] = field(default_factory=dict)  # token -> error for its artifacts
    refuse_once: dict[str, str] = field(default_factory=dict)  # ... for its next one only
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self) -> None:
        self.client.serve(COORD_PROTOCOL)
        threading.Thread(target=self._loop, args=(self.client,), daemon=True).start()

    def away(self) -> None:
        """Stop serving: the coordinator's daemon answers that no one serves the protocol."""
        self.client.close()

    def back(self) -> None:
        self.client = MeshClient(self.socket)
        self.serve()

    def _loop(self, client: MeshClient) -> None:
        while True:
            try:
                request = client.next_request(timeout=1.0)
                if request is None:
                    continue
                message = json.loads(request.payload)
                with self.lock:
                    self.messages.append(message)
                try:
                    answer = self._answer(client, message, request.peer)
                except Exception as error:  # the island sees it as a refusal
                    client.respond(request, error=f"{type(error).__name__}: {error}")
                else:
                    client.respond(request, json.dumps(answer).encode())
            except MeshError:  # closed by `away`
                return

    def _answer(self, client: MeshClient, message: dict[str, Any],
                island: str) -> dict[str, Any]:
        op = message["op"]
        if op == "join":
            return {"run": RUN, "heartbeat_seconds": 0.5, "lease_seconds": 30,
                    "coordinator": "fake"}
        if op == "heartbeat":
            with self.lock:
                offers, self.offers = [o.to_dict() for o in self.offers], []
                revoked, self.revoked = self.revoked, []
                calibrate, self.calibrate = self.calibrate[:1], self.calibrate[1:]
            return {"offers": offers, "revoked": revoked} | (
                {"calibrate": calibrate[0].to_dict()} if calibrate else {})
        if op == "artifact":
            if message["token"] in self.refuse:
                raise RuntimeError(self.refuse[message["token"]])
            if message["token"] in self.refuse_once:
                raise RuntimeError(self.refuse_once.pop(message["token"]))
            for path, ref in message["files"].items():
                dest = self.fetched / message["token"] / path
                client.fetch_blob(ref["root"], dest, [island], timeout=60)
                assert sha256(dest) == ref["sha256"], path
        return {}

    def of(self, token: str | None, op: str | None = None) -> list[dict[str, Any]]:
        """The messages under `token` (None: any), of `op` (None: any)."""
        with self.lock:
            return [m for m in self.messages if token in (None, m.get("token"))
                    and op in (None, m["op"])]

    def wait_for(self, found: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := found():
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; messages: "
                             f"{[(m['op'], m.get('token'), m.get('kind')) for m in self.messages]}")


@dataclass
class World:
    tmp: Path
    coordinator: FakeCoordinator
    spec: ExpertSpec
    inputs: dict[int, dict[str, FileRef]]   # cluster -> the shard as an input
    agent: subprocess.Popen[str]
    lines: list[str]
    command: list[str]
    env: dict[str, str]

    def restart(self) -> None:
        """The agent again, with the same key and storage (after it was killed)."""
        self.agent, self.lines = spawn(self.command, self.env)

    def offer(self, token: str, spec: ExpertSpec, cluster: int) -> None:
        expert, attempt = (int(part) for part in token.split(".")[:2])
        with self.coordinator.lock:
            self.coordinator.offers.append(Offer(token, expert, attempt, asdict(spec),
                                                 self.inputs[cluster]))

    def line(self, text: str) -> str:
        return self.coordinator.wait_for(
            lambda: next((line for line in list(self.lines) if text in line), None),
            f"agent line {text!r} (lines: {self.lines})")


def spawn(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(agent.stdout), daemon=True).start()
    return agent, lines


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gone(pid: int) -> bool:
    """The process is gone (reaped by the agent), not merely a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("island")
    config = parse_config(tiny_config(f"file://{tmp}", run=RUN))
    layout = RunLayout(f"file://{tmp}/{RUN}")
    run_partition(partition_request(config), layout)
    spec = expert_spec(config, layout, expert=0, island=IslandSpec(name="island-a", speed=1.0),
                       recipe=recipe(config))
    # keep_checkpoints 3: none is pruned, so every step the test expects stays to be pushed
    spec = ExpertSpec(**{**spec.__dict__, "steps": 12, "checkpoint_every": 5, "log_every": 2,
                         "keep_checkpoints": 3, "threads": 1, "snapshot_at": (0.5,)})
    island_id = str(load_identity(tmp / "island" / "island.key").peer_id)
    coordinator_id = str(load_identity(tmp / "coord.key").peer_id)
    daemons = {"coord": Daemon("coord", tmp, [island_id], coordinator_id)}
    with running(daemons, "") as started:
        coord = started["coord"]
        store = FsspecBlobStore(coord.store_url)
        inputs = {}
        for cluster in (0, 1):
            manifest = store.put(tmp / RUN / SHARD.format(cluster))
            inputs[cluster] = {SHARD.format(cluster): FileRef(manifest.root, manifest.sha256,
                                                              manifest.size)}
        coordinator = FakeCoordinator(MeshClient(coord.socket), coord.socket, tmp / "fetched")
        coordinator.serve()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        command = [sys.executable, "-m", "orchestrator.cli.main", "island", "join",
                   "--coordinator", coord.address, "--name", "island-a",
                   "--storage", str(tmp / "island"), "--listen", "/ip4/127.0.0.1/tcp/0",
                   "--cpus", "2"]
        world = World(tmp, coordinator, spec, inputs, *spawn(command, env), command, env)
        try:
            yield world
        finally:
            if world.agent.poll() is None:
                world.agent.kill()
                world.agent.wait(timeout=30)
            coordinator.client.close()


def test_an_offered_expert_is_trained_pushed_and_done_bit_for_bit(world):
    token = "0.1.first"
    world.offer(token, world.spec, cluster=0)
    coord = world.coordinator
    coord.wait_for(lambda: coord.of(token, "done"), "done")
    assert coord.of(None, "join")[0]["capacity"]["cpus"] == 2
    ops = [m["op"] for m in coord.of(token)]
    assert ops[0] == "claim" and ops[-1] == "done" and "progress" in ops
    artifacts = coord.of(token, "artifact")
    checkpoints = [m for m in artifacts if m["kind"] == "checkpoint"]
    assert [m["step"] for m in checkpoints] == [5, 10, 12]
    for message in checkpoints:
        names = [path.rsplit("/", 1)[1] for path in message["files"]]
        assert names[-1] == "meta.json" and "model.safetensors" in names
    final = next(m for m in artifacts if m["kind"] == "final")
    assert sorted(final["files"]) == ["experts/expert-0/final/meta.json",
                                      "experts/expert-0/final/model.safetensors",
                                      "experts/expert-0/final/raw.safetensors"]
    # The result lists the snapshot: it is pushed before done, meta.json last.
    snapshot = next(m for m in artifacts if m["kind"] == "snapshot")
    assert snapshot["step"] == 6 and list(snapshot["files"]) == [
        f"experts/expert-0/snapshots/step-00000006/{name}"
        for name in ("ema.safetensors", "model.safetensors", "meta.json")]
    assert artifacts.index(snapshot) < artifacts.index(final)
    assert {"experts/expert-0/metrics.parquet", "experts/expert-0/log/part-00001-0001.txt"} <= {
        path for m in artifacts if m["kind"] == "files" for path in m["files"]}
    result = coord.of(token, "done")[0]["result"]
    assert result["steps"] == 12 and result["expert"] == 0
    assert any(token in m["tokens"] for m in coord.of(None, "heartbeat"))
    for line in ("joined run island-test as island-a", "claimed expert 0",
                 "checkpoint step 5 pushed", "done at step 12"):
        world.line(line)

    # The same spec and shard trained here, in this process, by the Ray path's function.
    direct = world.tmp / "direct"
    (direct / SHARD.format(0)).parent.mkdir(parents=True)
    shutil.copy(world.tmp / RUN / SHARD.format(0), direct / SHARD.format(0))
    train_expert(world.spec, RunLayout(f"file://{direct}"), log=lambda _: None)
    weights = "experts/expert-0/final/model.safetensors"
    assert sha256(coord.fetched / token / weights) == sha256(direct / weights)
    assert final["files"][weights]["sha256"] == sha256(direct / weights)


def test_a_revoked_token_kills_its_training_at_once(world):
    token = "1.1.revoked"
    spec = ExpertSpec(**{**world.spec.__dict__, "expert": 1, "steps": 100_000,
                         "checkpoint_every": 100_000, "log_every": 1})
    world.offer(token, spec, cluster=1)
    coord = world.coordinator
    coord.wait_for(lambda: len(coord.of(token, "progress")) >= 2, "training progress")
    pid = int(world.line("expert 1: training (pid").rsplit("pid ", 1)[1].rstrip(")\n"))
    assert not gone(pid)
    with coord.lock:
        coord.revoked.append(token)
    coord.wait_for(lambda: gone(pid), f"pid {pid} to end")
    world.line("expert 1: revoked")
    sent = len(coord.of(token))
    coord.wait_for(lambda: len([m for m in coord.of(None, "heartbeat")
                                if token not in m["tokens"]]) > 2, "heartbeats without it")
    assert len(coord.of(token)) <= sent + 1  # at most a progress row already in flight
    assert not coord.of(token, "done") and not coord.of(token, "failed")


def test_a_superseded_refusal_stops_the_attempt(world):
    token = "2.1.superseded"
    spec = ExpertSpec(**{**world.spec.__dict__, "expert": 2, "shard_clusters": (0,),
                         "steps": 100_000, "checkpoint_every": 3, "log_every": 1})
    coord = world.coordinator
    coord.refuse[token] = f"{SUPERSEDED}: lease {token} was given to another island"
    world.offer(token, spec, cluster=0)
    coord.wait_for(lambda: coord.of(token, "artifact"), "a refused artifact")
    pid = int(world.line("expert 2: training (pid").rsplit("pid ", 1)[1].rstrip(")\n"))
    coord.wait_for(lambda: gone(pid), f"pid {pid} to end")
    world.line("expert 2: superseded")
    sent = len(coord.of(token))
    time.sleep(2.0)
    assert len(coord.of(token)) == sent
    assert len(coord.of(token, "artifact")) == 1


def test_a_refused_artifact_is_sent_again_in_its_place(world):
    token = "6.1.refused"
    coord = world.coordinator
    coord.refuse_once[token] = "could not fetch a blob from the island"
    world.offer(token, ExpertSpec(**{**world.spec.__dict__, "expert": 6, "shard_clusters": (0,)}),
                cluster=0)
    coord.wait_for(lambda: coord.of(token, "done"), "done")
    world.line("expert 6: the coordinator refused artifact (request to peer")
    artifacts = [(m["kind"], m["step"]) for m in coord.of(token, "artifact")]
    assert artifacts[:3] == [("checkpoint", 5), ("checkpoint", 5), ("files", 5)]


def test_an_input_error_and_a_crash_are_reported_as_failed(world):
    bad_input, crash = "4.1.input", "5.1.crash"
    world.offer(bad_input, ExpertSpec(**{**world.spec.__dict__, "expert": 4, "model": "nosuch",
                                         "shard_clusters": (0,)}), cluster=0)
    world.offer(crash, ExpertSpec(**{**world.spec.__dict__, "expert": 5, "shard_clusters": (0,),
                                     "model_kwargs": {"nosuch": 1}}), cluster=0)
    coord = world.coordinator
    failed = coord.wait_for(lambda: coord.of(bad_input, "failed"), "failed (input)")[0]
    assert failed["input_error"]["where"] == "experts.model"
    assert "nosuch" in failed["input_error"]["problem"] and "nosuch" in failed["error"]
    failed = coord.wait_for(lambda: coord.of(crash, "failed"), "failed (crash)")[0]
    assert failed["input_error"] is None
    assert "exited with code 1" in failed["error"] and "TypeError" in failed["error"]
    world.line("expert 4: failed on its input")
    world.line("expert 5: crashed (exit code 1)")
    assert not coord.of(bad_input, "done") and not coord.of(crash, "done")


def test_while_the_coordinator_is_away_training_goes_on_and_the_queue_waits_for_a_join(world):
    token = "3.1.away"
    spec = ExpertSpec(**{**world.spec.__dict__, "expert": 3, "shard_clusters": (1,),
                         "steps": 20, "checkpoint_every": 5, "keep_checkpoints": 5})
    coord = world.coordinator
    world.offer(token, spec, cluster=1)
    coord.wait_for(lambda: coord.of(token, "progress"), "training progress")
    joins = len(coord.of(None, "join"))
    coord.away()
    final = world.tmp / "island" / "runs" / RUN / "experts" / "expert-3" / "final" / "meta.json"
    coord.wait_for(final.exists, "training to end while the coordinator is away")
    world.line("coordinator unreachable")
    world.line("retrying in")
    coord.back()
    coord.wait_for(lambda: coord.of(token, "done"), "done once the coordinator is back")
    assert len(coord.of(None, "join")) > joins
    with coord.lock:
        ops = [(m["op"], m.get("token")) for m in coord.messages]
    rejoined = len(ops) - 1 - ops[::-1].index(("join", None))
    assert rejoined < ops.index(("done", token))
    checkpoints = [m for m in coord.of(token, "artifact") if m["kind"] == "checkpoint"]
    # A push whose answer was lost as the coordinator went away is sent again: each
    # checkpoint arrives, in order, at least once.
    steps = [m["step"] for m in checkpoints]
    assert steps == sorted(steps) and sorted(set(steps)) == [5, 10, 15, 20]
    assert coord.of(token, "done")[0]["result"]["steps"] == 20


def test_a_calibration_request_is_timed_on_the_island_and_answered_with_speed(world):
    token = "calibrate.island-a.x"
    coord = world.coordinator
    with coord.lock:
        coord.calibrate.append(Offer(token, 0, 0, asdict(world.spec), world.inputs[0]))
    speed = coord.wait_for(lambda: coord.of(token, "speed"), "a speed")[0]
    assert speed["error"] is None and speed["result"]["samples_per_s"] > 0
    assert speed["result"]["micro_batch"] >= 1
    world.line("speed measured:")
    # A measurement is no lease: never reported in a heartbeat, and nothing pushed for it.
    assert not any(token in m["tokens"] for m in coord.of(None, "heartbeat"))
    assert [m["op"] for m in coord.of(token)] == ["speed"]


def test_a_restarted_agent_carries_on_the_attempts_whose_leases_hold(world):
    """SIGKILLed mid-training and started again on the same storage, the agent reports both
    of its leases in its first heartbeat: the one the coordinator revokes is dropped, the
    other goes on from the island's newest checkpoint to the same weights as one
    uninterrupted run."""
    kept, dropped = "7.1.kept", "8.1.dropped"
    spec = ExpertSpec(**{**world.spec.__dict__, "expert": 7, "shard_clusters": (0,),
                         "steps": 30, "checkpoint_every": 5, "keep_checkpoints": 2})
    endless = ExpertSpec(**{**world.spec.__dict__, "expert": 8, "shard_clusters": (1,),
                            "steps": 100_000, "checkpoint_every": 100_000})
    coord = world.coordinator
    world.offer(kept, spec, cluster=0)
    world.offer(dropped, endless, cluster=1)
    coord.wait_for(lambda: [m for m in coord.of(kept, "artifact") if m["step"] == 10]
                   and coord.of(dropped, "progress"), "both training, one checkpointed")
    world.agent.kill()
    world.agent.wait(timeout=30)
    with coord.lock:
        coord.revoked.append(dropped)   # told at the restarted agent's first heartbeat
    world.restart()
    world.line("2 earlier attempts to carry on")
    world.line("expert 7: carrying on attempt 1 after a restart")
    world.line("expert 8: the lease of attempt 1 from before the restart is not held")
    coord.wait_for(lambda: coord.of(kept, "done"), "done after the restart")
    assert not coord.of(dropped, "done")
    direct = world.tmp / "direct-kept"
    (direct / SHARD.format(0)).parent.mkdir(parents=True)
    shutil.copy(world.tmp / RUN / SHARD.format(0), direct / SHARD.format(0))
    train_expert(spec, RunLayout(f"file://{direct}"), log=lambda _: None)
    weights = "experts/expert-7/final/model.safetensors"
    assert sha256(coord.fetched / kept / weights) == sha256(direct / weights)
    assert coord.of(kept, "done")[0]["result"]["resumed_from"] >= 10


def test_sigterm_ends_the_agent_cleanly(world):
    world.agent.send_signal(signal.SIGTERM)
    assert world.agent.wait(timeout=60) == 0


def test_a_bad_coordinator_address_is_one_line_and_exit_2(tmp_path):
    for address in ("/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4001/p2p/notapeer",
                    "127.0.0.1:4001"):
        result = CliRunner().invoke(app, ["island", "join", "--coordinator", address,
                                          "--name", "a", "--storage", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert "--coordinator" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def start_agent(tmp: Path, *options: str) -> tuple[subprocess.Popen[str], list[str]]:
    """An agent whose coordinator never answers: a roster peer ID on a closed port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nobody = load_identity(tmp / "nobody.key").peer_id
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    agent = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli.main", "island", "join",
         "--coordinator", f"/ip4/127.0.0.1/tcp/{port}/p2p/{nobody}", "--name", "lonely",
         "--storage", str(tmp / "island"), "--listen", "/ip4/127.0.0.1/tcp/0", *options],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(agent.stdout), daemon=True).start()
    return agent, lines


def test_an_agent_gives_up_on_a_coordinator_unreachable_for_long(tmp_path):
    agent, lines = start_agent(tmp_path, "--give-up-after", "2")
    assert agent.wait(timeout=WAIT) == 1, lines
    assert any("retrying in 1 s" in line for line in lines), lines
    assert "giving up" in lines[-1], lines


def test_a_killed_agent_takes_its_daemon_with_it(tmp_path):
    agent, lines = start_agent(tmp_path)
    try:
        deadline = time.monotonic() + WAIT
        while not any("retrying" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.2)
        children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
        assert children, lines
        agent.kill()
        agent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not all(gone(int(pid)) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(gone(int(pid)) for pid in children)
    finally:
        if agent.poll() is None:
            agent.kill()


def test_a_spec_comes_back_from_json_with_its_tuples_and_init_from_inside_the_run():
    spec = ExpertSpec(expert=-1, model="unet", model_kwargs={"channel_mult": (1, 2)}, steps=3,
                      batch_size=4, lr=1e-3, warmup_steps=1, weight_decay=0.0, grad_clip=1.0,
                      ema_decay=0.9, checkpoint_every=1, keep_checkpoints=1, threads=1,
                      log_every=1, seed=1, shard_clusters=(0, 1), imports=("tests.toy_signals",),
                      init_from="experts/seed/final/model.safetensors")
    back = spec_from_dict(json.loads(json.dumps(asdict(spec))), "/runs/r")
    assert back.shard_clusters == (0, 1) and back.imports == ("tests.toy_signals",)
    assert back.init_from == "/runs/r/experts/seed/final/model.safetensors"
    assert json.dumps(asdict(back)) == json.dumps(asdict(spec) | {"init_from": back.init_from})
    for bad in ({**asdict(spec), "init_from": "../elsewhere"}, {**asdict(spec), "nosuch": 1},
                {"expert": 0}, [1]):
        with pytest.raises(InputError):
            spec_from_dict(bad, "/runs/r")
