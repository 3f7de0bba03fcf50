"""The decentralized half of `scripts/chaos.py --mesh N`: a coordinator (`islands run` with
`islands.launcher: mesh`) and N island agents (`islands island join`), each a process group
of its own on 127.0.0.1 with its own storage folder, while islands are SIGKILLed (then
restarted with the same key) or SIGSTOPped (then thawed once their lease has lapsed), and
the coordinator is SIGKILLed and continued with `islands resume`.

An island is hit only once its current attempt has reported a checkpoint interval of
progress, and the coordinator only while every running attempt has reported progress, so
each kill lands mid-training. Each island kill is recorded with its time, so the report
gives how long the coordinator took to end the lost attempt (the attempt's `ended` in the
manifest minus the kill).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from rich.console import Console

from orchestrator.mesh.identity import load_identity

TRAINER = "orchestrator.mesh.island_train"
ISLANDS = [sys.executable, "-m", "orchestrator.cli.main"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mesh_config(config: Path, folder: Path, islands: int, lease_seconds: float) -> str:
    """Turn the chaos config into a mesh run in place; the coordinator's address."""
    raw = yaml.safe_load(config.read_text())
    peers = {f"island-{i}": str(load_identity(folder / f"island-{i}.key").peer_id)
             for i in range(islands)}
    coordinator = str(load_identity(folder / "coordinator.key").peer_id)
    port = free_port()
    raw["islands"] = {"launcher": "mesh", "pool": [{"name": name, "speed": 1.0, "peer": peer}
                                                   for name, peer in peers.items()]}
    raw["mesh"] = {"key": str(folder / "coordinator.key"),
                   "listen": [f"/ip4/127.0.0.1/tcp/{port}"], "roster": list(peers.values()),
                   "heartbeat_seconds": 0.5, "lease_seconds": lease_seconds,
                   "join_seconds": 300.0, "bulk": {"listen": "/ip4/127.0.0.1/tcp/0"}}
    config.write_text(yaml.safe_dump(raw))
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{coordinator}"


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as handle:  # a process group of its own: one machine
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def training(agent: subprocess.Popen) -> bool:
    """Whether the agent has an expert's training subprocess running."""
    try:
        children = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if TRAINER in " ".join(child.cmdline()):
                return True
    return False


class MeshChaos:
    def __init__(self, config: Path, run_dir: Path, folder: Path, args: argparse.Namespace,
                 rng: random.Random, console: Console) -> None:
        self.config, self.run_dir, self.folder = config, run_dir, folder
        self.args, self.rng, self.console = args, rng, console
        self.coordinator = mesh_config(config, folder, args.mesh, args.mesh_lease_seconds)
        self.names = [f"island-{i}" for i in range(args.mesh)]
        self.driver_log = folder / "coordinator.log"
        self.driver: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}
        self.events: list[dict[str, Any]] = []
        self.interval = int(yaml.safe_load(config.read_text())["experts"]["checkpoint_every"])
        self.since = 0.0   # when the running coordinator started: older attempts are stale

    def running(self) -> dict[str, int]:
        """The islands with a running attempt, and the steps each attempt has reported past
        where it started."""
        try:
            manifest = json.loads((self.run_dir / "manifest.json").read_text())
        except (OSError, ValueError):
            return {}
        progress = {}
        for entry in manifest.get("experts", {}).values():
            last = (entry.get("attempts") or [{}])[-1]
            if entry.get("state") == "running" and "ended" not in last \
                    and last.get("started", 0.0) >= self.since:
                progress[last["island"]] = (last.get("reported_step") or 0) \
                    - (last.get("resumed_from") or 0)
        return progress

    def join(self, name: str) -> subprocess.Popen:
        return start([*ISLANDS, "island", "join", "--coordinator", self.coordinator,
                      "--name", name, "--storage", str(self.folder / name),
                      "--key", str(self.folder / f"{name}.key"),
                      "--listen", "/ip4/127.0.0.1/tcp/0"], self.folder / f"{name}.log")

    def run(self) -> dict[str, Any]:
        args = self.args
        self.driver = start([*ISLANDS, "run", str(self.config)], self.driver_log)
        self.agents = {name: self.join(name) for name in self.names}
        kinds = ["kill", "stop"] * args.island_kills
        kinds = kinds[:args.island_kills]
        self.rng.shuffle(kinds)
        # Coordinator kills spread among the island kills, after the first.
        coordinator_after = sorted(self.rng.sample(range(1, args.island_kills + 1),
                                                   args.coordinator_kills))
        island_kills = coordinator_kills = 0
        deadline = time.time() + args.timeout
        try:
            while time.time() < deadline:
                time.sleep(self.rng.uniform(args.min_wait, args.max_wait))
                if self.driver.poll() is not None:
                    if self.driver.returncode == 0:
                        break
                    raise SystemExit(f"coordinator exited with {self.driver.returncode}; "
                                     f"see {self.driver_log}")
                progress = self.running()
                if coordinator_kills < len(coordinator_after) \
                        and island_kills >= coordinator_after[coordinator_kills]:
                    if progress and all(steps > 0 for steps in progress.values()):
                        self.kill_coordinator()
                        coordinator_kills += 1
                    continue
                if island_kills < args.island_kills:
                    busy = [n for n, steps in progress.items() if steps >= self.interval
                            and training(self.agents[n])]
                    if not busy:
                        continue
                    self.hit(self.rng.choice(busy), kinds[island_kills])
                    island_kills += 1
            else:
                raise SystemExit(f"the mesh chaos run did not finish in {args.timeout}s; "
                                 f"see {self.driver_log}")
            self.driver.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            self.stop()
        return {"island_kills": island_kills, "coordinator_kills": coordinator_kills,
                "events": self.events, "exit_code": self.driver.returncode}

    def hit(self, name: str, kind: str) -> None:
        agent = self.agents[name]
        at = time.time()
        if kind == "kill":   # the machine dies; it comes back with the same key and disk
            signal_group(agent, signal.SIGKILL)
            agent.wait()
            self.console.print(f"SIGKILL island {name}")
            time.sleep(self.rng.uniform(1.0, 3.0))
            self.agents[name] = self.join(name)
        else:                 # the machine hangs past its lease, then carries on
            signal_group(agent, signal.SIGSTOP)
            self.console.print(f"SIGSTOP island {name}")
            time.sleep(self.args.mesh_lease_seconds + self.rng.uniform(1.0, 3.0))
            signal_group(agent, signal.SIGCONT)
        self.events.append({"t": at, "kind": f"island {kind}", "island": name})

    def kill_coordinator(self) -> None:
        assert self.driver is not None
        signal_group(self.driver, signal.SIGKILL)
        self.driver.wait()
        self.events.append({"t": time.time(), "kind": "coordinator kill"})
        self.console.print("SIGKILL the coordinator")
        time.sleep(self.rng.uniform(2.0, 6.0))   # the islands train on alone
        # Islands are hit again once the resumed coordinator runs their attempts.
        self.since = time.time()
        self.driver = start([*ISLANDS, "resume", str(self.run_dir)], self.driver_log)

    def stop(self) -> None:
        processes = [p for p in [self.driver, *self.agents.values()] if p is not None]
        for process in processes:
            signal_group(process, signal.SIGCONT)
            if process.poll() is None:
                signal_group(process, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                signal_group(process, signal.SIGKILL)
                process.wait()


def detection_seconds(events: list[dict[str, Any]],
                      manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Per island kill: how long until the coordinator ended, as a lost island, the attempt
    that island was running then. None when that attempt ended otherwise (the coordinator
    was away, and carried it over) or no attempt ran there."""
    attempts = [attempt for entry in manifest["experts"].values()
                for attempt in entry["attempts"] if "ended" in attempt]
    found = []
    for event in events:
        if not event["kind"].startswith("island"):
            continue
        hit = [a for a in attempts if a["island"] == event["island"]
               and a["started"] <= event["t"] <= a["ended"]]
        lost = [a["ended"] for a in hit if "left" in a.get("reason", "")]
        found.append({**event, "detected_after_s":
                      round(min(lost) - event["t"], 3) if lost else None})
    return found
