"""`islands serve` started as a real subprocess on a free port of 127.0.0.1, for tests: it
runs its own local Ray and stops it when terminated."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
START_LIMIT_S = 240.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lowered(headers: Any) -> dict[str, str]:
    """Header names in lower case (HTTP's are case-insensitive; the proxy lowers them)."""
    return {name.lower(): value for name, value in headers.items()}


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    run_dir: Path

    def get(self, path: str, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as answer:
                return answer.status, lowered(answer.headers), answer.read()
        except urllib.error.HTTPError as err:
            return err.code, lowered(err.headers), err.read()

    def post(self, path: str, body: Any, timeout: float = 120
             ) -> tuple[int, dict[str, str], dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, lowered(answer.headers), json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, lowered(err.headers), json.loads(err.read() or b"{}")

    def ready(self) -> dict[str, Any] | None:
        try:
            status, _, body = self.get("/readyz", timeout=5)
        except OSError:
            return None
        return json.loads(body) if status == 200 else None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(run_dir: Path, log: Path, *args: str, wait: bool = True) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    handle = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli.main", "serve", str(run_dir), "--port",
         str(port), *args], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = Server(f"http://127.0.0.1:{port}", process, log, run_dir)
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: Server, limit_s: float = START_LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"islands serve exited {server.process.returncode}:\n"
                               f"{server.output()[-3000:]}")
        if server.ready() is not None:
            return
        time.sleep(0.2)
    raise TimeoutError(f"islands serve not ready in {limit_s} s:\n{server.output()[-3000:]}")


def stop_server(server: Server) -> None:
    """SIGTERM: the server shuts Serve and its own Ray down, and exits."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
