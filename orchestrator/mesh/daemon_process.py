"""A mesh daemon as a child process, as the coordinator and island agents both run one:
its config file, a Unix socket path short enough, its ready line read within a bound, and
one clear error from its log when it does not start."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

START_SECONDS = 180.0   # a loaded machine can take long to import libp2p
REPO = Path(__file__).resolve().parents[2]


class DaemonStartError(RuntimeError):
    """The daemon exited, or printed no ready line in time."""


def die_with_parent() -> None:
    """A child gets SIGKILL when the thread that started it dies, even by SIGKILL (Linux
    prctl PR_SET_PDEATHSIG). Children also run in sessions of their own (start_new_session),
    so a Ctrl-C in the parent's terminal reaches the parent only, which stops them itself."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def kill(process: subprocess.Popen[str] | None) -> None:
    if process is not None and process.poll() is None:
        with contextlib.suppress(OSError):
            process.kill()
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)


def read_line(stream: IO[str] | None, timeout: float) -> str:
    """The next line of `stream`, or "" after `timeout` seconds (a hung child)."""
    lines: list[str] = []
    if stream is None:
        return ""
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


def drain(stream: IO[str] | None) -> None:
    if stream is not None:
        for _ in stream:
            pass


@dataclass
class DaemonProcess:
    process: subprocess.Popen[str]
    ready: dict[str, Any]      # the daemon's ready line: peer_id, addresses, ...
    socket: Path
    socket_dir: str | None     # a temporary folder for a socket path too long, to remove

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill(self.process)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def start_daemon(folder: Path, run: str, mesh: dict[str, Any], store_url: str) -> DaemonProcess:
    """Start `python -m orchestrator.mesh.daemon` for the `mesh:` section `mesh`, with its
    config, socket and log (`daemon.log`) in `folder`, serving the blobs at `store_url`."""
    config = folder / "mesh.yaml"
    config.write_text(yaml.safe_dump({"run": run, "mesh": mesh}))
    socket_path, socket_dir = folder / "mesh.sock", None
    if len(str(socket_path)) > 100:   # a Unix socket path has at most 107 bytes
        socket_dir = tempfile.mkdtemp(prefix="islands-")
        socket_path = Path(socket_dir) / "mesh.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log_path = folder / "daemon.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.mesh.daemon", "--config", str(config),
             "--socket", str(socket_path), "--store", store_url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
            start_new_session=True, preexec_fn=die_with_parent)
    line = read_line(process.stdout, START_SECONDS)
    if not line.startswith("{"):
        kill(process)
        last = (log_path.read_text(errors="replace").strip().splitlines() or [""])[-1]
        raise DaemonStartError(f"it did not start (its log {log_path} ends: {last[-300:]})")
    threading.Thread(target=drain, args=(process.stdout,), daemon=True).start()
    return DaemonProcess(process, json.loads(line), socket_path, socket_dir)
