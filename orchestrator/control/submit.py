"""Submitting a run: to a Ray cluster through Ray's job submission API, or to a driver in
the background on this machine. Either way the caller gets the run back at once.

A Ray job carries the config (storage made absolute, Ray address `auto`) in its working
directory and the project's packages as `py_modules`, so the cluster needs only the
dependencies installed. What was submitted, and where, is kept in the run directory's
`submission.json`, which `islands status`, `logs` and `cancel` read.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.control.cluster import how_to_add, island_nodes
from orchestrator.state.config import RunConfig, config_to_yaml
from orchestrator.state.lease import RunLease
from orchestrator.state.run_config import layout_for, refuse_changed_config, resolve_storage
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout

AGENT_WAIT_SECONDS = 120.0
PACKAGES = ("runstore", "partitioner", "worker", "orchestrator")
# What a job's driver and workers need from the submitter's environment.
FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_BASE_URL",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "ISLANDS_STORAGE_RETRIES", "ISLANDS_STORAGE_RETRY_DELAY")


def job_client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    # Ray logs every package upload at INFO; the user needs only our lines.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)

    if not address.startswith(("http://", "https://")):
        raise InputError("--address", f"expected the Ray dashboard's URL, like "
                         f"http://HEAD:8265 (got {address!r})")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise InputError("--address", f"cannot reach Ray's job API at {address} ({err}); with "
                         "token authentication set RAY_AUTH_MODE=token and the head's "
                         "RAY_AUTH_TOKEN") from None


def cluster_nodes(address: str) -> list[dict[str, Any]]:
    """The cluster's live nodes through the dashboard, shaped like `ray.nodes()`."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
    except Exception as err:  # the state API raises several kinds for an unreachable head
        raise InputError("--address", f"cannot list the nodes of {address} ({err})") from None
    return [{"Alive": node.state == "ALIVE", "Resources": dict(node.resources_total or {}),
             "Labels": dict(node.labels or {}), "NodeManagerAddress": node.node_ip}
            for node in nodes]


def check_cluster(config: RunConfig, address: str) -> None:
    """An island missing from the cluster is a clear error now, not a job waiting forever."""
    nodes = cluster_nodes(address)
    missing = [spec for spec in config.islands.specs() if not island_nodes(spec, nodes)]
    if missing:
        raise InputError("islands.pool", f"island(s) {', '.join(s.name for s in missing)} "
                         f"not in the Ray cluster at {address}; add a node with: "
                         f"{how_to_add(missing[0])}")


def check_not_running(config: RunConfig, layout: RunLayout) -> None:
    holder = RunLease(layout, config.fault_tolerance.lease_seconds).live_holder()
    if holder:
        raise InputError(layout.root, f"run is already being driven by pid {holder['pid']} on "
                         f"{holder['host']}; see islands status {layout.root}")


def staged(config: RunConfig, address: str | None) -> Path:
    """A folder holding only the config the driver will run."""
    folder = Path(tempfile.mkdtemp(prefix="islands-submit-"))
    islands = config.islands.model_copy(update={"address": "auto" if address else None})
    final = config.model_copy(update={"islands": islands})
    (folder / "config.yaml").write_text(config_to_yaml(final))
    return folder


def package_dirs() -> list[str]:
    import importlib

    return [str(Path(importlib.import_module(name).__file__).parent) for name in PACKAGES]


def submit_job(address: str, layout: RunLayout, working_dir: Path, command: list[str],
               name: str) -> str:
    client = job_client(address)
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    job_id = f"islands-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            client.submit_job(
                entrypoint=" ".join(["python", "-m", "orchestrator.cli.main", *command]),
                submission_id=job_id,
                runtime_env={"working_dir": str(working_dir), "py_modules": package_dirs(),
                             "env_vars": env},
                metadata={"run": layout.root})
            break
        except RuntimeError as err:
            # A head that just started (or is busy) has no job agent yet: Ray says to retry.
            if "try again later" in str(err) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise InputError("--address", f"Ray did not take the job: {err}") from None
    storage.write_json(layout.submission, {"kind": "ray-job", "address": address,
                                           "job_id": job_id, "command": command,
                                           "submitted": round(time.time(), 3)})
    return job_id


def start_local(config: RunConfig, layout: RunLayout, working_dir: Path,
                command: list[str], wait: float = 120.0) -> int:
    """The driver in the background on this machine, its output in the run's driver.log
    (a local file next to the run, or a cache file for a run on an object store). Returns
    once the driver holds the run's lease, so a second submit is refused, not raced."""
    fs_path = layout.driver_log.removeprefix("file://")
    if not layout.driver_log.startswith("file://"):
        cache = Path.home() / ".cache" / "islands" / "logs"
        cache.mkdir(parents=True, exist_ok=True)
        fs_path = str(cache / f"{Path(layout.root).name}.log")
    Path(fs_path).parent.mkdir(parents=True, exist_ok=True)
    with open(fs_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli.main", *command], cwd=working_dir,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(package_dirs()[0]).parent), os.environ.get("PYTHONPATH", "")])})
    lease = RunLease(layout, config.fault_tolerance.lease_seconds)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        holder = lease.holder()
        if holder and holder.get("pid") == process.pid:
            break
        if process.poll() is not None:
            if process.returncode == 0:  # nothing to do: the run was already complete
                break
            lines = Path(fs_path).read_text(errors="replace").strip().splitlines()
            raise InputError(layout.root, "the driver stopped at once: "
                             f"{lines[-1] if lines else 'no output'} (see {fs_path})")
        time.sleep(0.2)
    storage.write_json(layout.submission, {"kind": "local", "pid": process.pid,
                                           "log": fs_path, "command": command,
                                           "submitted": round(time.time(), 3)})
    return process.pid


def submit_run(config: RunConfig, address: str | None) -> tuple[RunLayout, str]:
    """Send `islands run` of this config; returns the run's layout and the job id (or pid)."""
    if config.storage.startswith("memory://"):
        raise InputError("storage", "memory:// lives inside one process; a submitted run "
                         "needs storage the driver and workers share")
    config = config.model_copy(update={"storage": resolve_storage(config.storage)})
    layout = layout_for(config)
    refuse_changed_config(config, layout)
    check_not_running(config, layout)
    if address:
        check_cluster(config, address)
    folder = staged(config, address)
    if address:
        return layout, submit_job(address, layout, folder, ["run", "config.yaml"], config.run)
    return layout, str(start_local(config, layout, folder, ["run", "config.yaml"]))


def submit_resume(layout: RunLayout, config: RunConfig, address: str) -> str:
    """`islands resume RUN` as a Ray job on the cluster."""
    check_not_running(config, layout)
    check_cluster(config, address)
    folder = Path(tempfile.mkdtemp(prefix="islands-submit-"))
    return submit_job(address, layout, folder, ["resume", layout.root, "--address", "auto"],
                      config.run)


def submission(layout: RunLayout) -> dict[str, Any] | None:
    try:
        return storage.read_json(layout.submission)
    except (FileNotFoundError, ValueError):
        return None


def job_status(record: dict[str, Any] | None) -> str | None:
    """RUNNING, SUCCEEDED, ... for a Ray job; running/exited for a local driver."""
    if not record:
        return None
    if record["kind"] == "local":
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return "exited"
        except PermissionError:
            return "running"
        return "running" if _not_zombie(record["pid"]) else "exited"
    try:
        return str(job_client(record["address"]).get_job_status(record["job_id"]).value)
    except Exception as err:  # the head may be gone; status must still show the manifest
        return f"unknown ({type(err).__name__})"


def _not_zombie(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
