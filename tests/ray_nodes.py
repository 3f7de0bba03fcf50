"""A Ray cluster of separate nodes on 127.0.0.1, started by a test and stopped by it.

Each node gets its own --temp-dir, so the test can find and stop exactly the processes it
started (and one node alone, to simulate losing it) without touching any other Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import psutil

RAY = shutil.which("ray") or "ray"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def auth_env() -> dict[str, str]:
    """Ray 2.60 clusters require token auth: nodes and drivers join with the head's token.
    This interpreter comes first on PATH, so a Ray job's `python` entrypoint is ours."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=path)
    token_file = Path.home() / ".ray" / "auth_token"
    if token_file.exists():
        env["RAY_AUTH_TOKEN"] = token_file.read_text().strip()
    return env


class LoopbackCluster:
    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard: str | None = None  # http://127.0.0.1:PORT when the head serves one
        self.nodes: dict[str, Path] = {}

    def _start(self, name: str, extra: list[str], cpus: int, resources: dict[str, float],
               labels: dict[str, str] | None = None) -> None:
        # Short paths: Ray's unix sockets live under the temp dir and have a length limit.
        temp_dir = Path(tempfile.mkdtemp(prefix=f"rn-{name}-", dir="/tmp"))
        self.nodes[name] = temp_dir
        command = [RAY, "start", *extra, "--node-ip-address", "127.0.0.1",
                   "--num-cpus", str(cpus), "--resources", json.dumps(resources),
                   "--temp-dir", str(temp_dir), "--disable-usage-stats",
                   # Each node's agent needs its own HTTP port: with the default, a second
                   # Ray on this machine takes it and the head cannot accept jobs.
                   "--dashboard-agent-listen-port", str(free_port())]
        if labels:
            command += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
        subprocess.run(command, check=True, env=auth_env(), capture_output=True, timeout=120)

    def start_head(self, cpus: int, resources: dict[str, float], dashboard: bool = False) -> None:
        """With `dashboard`, the head serves Ray's job submission API on a free port."""
        if dashboard:
            port = free_port()
            options = ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", str(port)]
            self.dashboard = f"http://127.0.0.1:{port}"
        else:
            options = ["--include-dashboard", "false"]
        self._start("head", ["--head", "--port", str(self.port), *options], cpus, resources)

    def add_node(self, name: str, cpus: int, resources: dict[str, float],
                 labels: dict[str, str] | None = None) -> None:
        self._start(name, ["--address", self.address], cpus, resources, labels)

    def processes(self, name: str) -> list[psutil.Process]:
        """Every process of node `name`: those naming its temp dir, and their children."""
        marker = str(self.nodes[name])
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if any(marker in part for part in proc.info["cmdline"] or []):
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
        return list(found.values())

    def kill_node(self, name: str) -> int:
        victims = self.processes(name)
        for proc in victims:
            with suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(victims, timeout=10)
        return len(victims)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            self.kill_node(name)
            shutil.rmtree(self.nodes[name], ignore_errors=True)

    def wait_for_resources(self, wanted: set[str], timeout: float = 60.0, nodes: int = 0) -> None:
        """Until the cluster offers every resource in `wanted` on at least `nodes` live nodes."""
        script = (f"import ray, json; ray.init(address='{self.address}', "
                  "logging_level='ERROR'); print(json.dumps([sorted(ray.cluster_resources()), "
                  "sum(n['Alive'] for n in ray.nodes())]))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            result = subprocess.run([sys.executable, "-c", script], env=auth_env(),
                                    capture_output=True, text=True, timeout=60)
            if result.returncode == 0:
                offered, alive = json.loads(result.stdout.splitlines()[-1])
                if wanted <= set(offered) and alive >= nodes:
                    return
            time.sleep(1.0)
        raise TimeoutError(f"cluster never offered {wanted} on {nodes} nodes")
