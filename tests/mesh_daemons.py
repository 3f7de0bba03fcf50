"""Mesh daemons as separate OS processes (on 127.0.0.1 unless told otherwise), each with a
MeshClient in the test process that echoes requests on ECHO and records those on SILENT
(shared by the mesh tests)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestrator.mesh.client import IncomingRequest, MeshClient, MeshError

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180.0   # a loaded 2-core machine can take long to import libp2p
ECHO, SILENT = "/test/echo/1", "/test/silent/1"
CHUNK = 256 * 1024


@dataclass
class Daemon:
    """A daemon process, its client in this process, and the requests that client served."""

    name: str
    folder: Path
    roster: list[str]
    peer_id: str = ""
    port: int = 0
    mesh: dict = field(default_factory=dict)  # more keys of the config's mesh: section
    process: subprocess.Popen | None = None
    client: MeshClient | None = None
    served: list[IncomingRequest] = field(default_factory=list)
    relay_service: bool = False  # the config's mesh.relay_service
    relays: list[str] = field(default_factory=list)  # the config's mesh.relays
    host: str = "127.0.0.1"  # the IPv4 address it listens on
    netns: str | None = None  # a network namespace to run it in (`ip netns exec`)
    relay_addresses: list[str] = field(default_factory=list)  # from its ready line

    @property
    def socket(self) -> Path:
        return self.folder / f"{self.name}.sock"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.stderr"

    @property
    def store_url(self) -> str:
        return f"file://{self.folder}/store-{self.name}"

    @property
    def address(self) -> str:
        return f"/ip4/{self.host}/tcp/{self.port}/p2p/{self.peer_id}"

    def start(self) -> None:
        """Start the process (on the same port as before, after a restart)."""
        config = self.folder / f"{self.name}.yaml"
        config.write_text(yaml.safe_dump({"run": "mesh-test", "mesh": {
            "key": str(self.folder / f"{self.name}.key"), "roster": self.roster,
            "listen": [f"/ip4/{self.host}/tcp/{self.port}"],
            "relay_service": self.relay_service, "relays": self.relays,
            "bulk": {"listen": f"/ip4/{self.host}/tcp/0"}, **self.mesh}}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        # `ip netns exec` execs the command, so the process is the daemon itself.
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with self.log.open("ab") as stderr:
            self.process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "orchestrator.mesh.daemon",
                 "--config", str(config),
                 "--socket", str(self.socket), "--store", self.store_url],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)

    def wait_ready(self) -> None:
        """Read the ready line (bounded), connect a client and answer on ECHO."""
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        assert lines and lines[0].startswith("{"), \
            f"{self.name}: no ready line; stderr: {self.log.read_text()[-2000:]}"
        ready = json.loads(lines[0])
        self.port = int(ready["addresses"][0].split("/tcp/")[1].split("/")[0])
        self.relay_addresses = list(ready["relay_addresses"])
        self.client = MeshClient(self.socket)
        assert self.client.peer_id == ready["peer_id"] == self.peer_id
        self.client.serve(ECHO)
        self.client.serve(SILENT)
        threading.Thread(target=self._answer, args=(self.client,), daemon=True).start()

    def _answer(self, client: MeshClient) -> None:
        """Echo requests on ECHO with this peer's name; record SILENT ones, never answer."""
        while True:
            try:
                request = client.next_request(timeout=1.0)
                if request is not None:
                    self.served.append(request)
                    if request.protocol == ECHO:
                        client.respond(request, self.name.encode() + b":" + request.payload)
            except MeshError:  # the daemon is gone (a test killed it) or the client closed
                return

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)


@contextlib.contextmanager
def running(daemons: dict[str, Daemon], meshed: str) -> Iterator[dict[str, Daemon]]:
    """Start every daemon, wait until all are ready, connect each pair among `meshed` (each
    dial must reach the peer it names); kill them all when done."""
    try:
        for daemon in daemons.values():
            daemon.start()
        for daemon in daemons.values():
            daemon.wait_ready()
        for i, name in enumerate(meshed):
            for other in meshed[i + 1:]:
                reached = daemons[name].client.dial(daemons[other].address)
                assert reached == daemons[other].peer_id, (name, other, reached)
        yield daemons
    finally:
        for daemon in daemons.values():
            if daemon.client is not None:
                daemon.client.close()
            daemon.kill()
