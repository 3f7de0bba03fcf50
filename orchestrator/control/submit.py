"""Submitting a run: to a Ray cluster through Ray's job submission API, or to a driver in
the background on this machine. Either way the caller gets the run back at once.

A Ray job carries the config (storage made absolute, Ray address `auto`) in its working
directory and the project's packages as `py_modules`, so the cluster needs only the
dependencies installed. Its env_vars are settings only, unless the user forwards more
(`job_env`). What was submitted, and where, is kept in the run directory's
`submission.json`, which `islands status`, `logs` and `cancel` read (`read_submission`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.state.config import RunConfig, config_to_yaml
from orchestrator.state.lease import RunLease
from orchestrator.state.run_config import layout_for, refuse_changed_config, resolve_storage
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.paths import check_path

AGENT_WAIT_SECONDS = 120.0
PACKAGES = ("runstore", "partitioner", "worker", "orchestrator")
# Forwarded to a Ray job by default: settings, never credentials. Ray keeps a job's
# runtime_env in its GCS and shows it in the dashboard and `ray job list`, so a key there
# is readable by anyone who can reach either; nodes bring their own (instance roles, a
# credentials file, `wandb login`), or the user names a variable with --forward-env.
# AWS_ACCESS_KEY_ID stays out too: without its secret, botocore refuses the pair instead
# of falling back to the node's own credentials.
FORWARDED_ENV = ("WANDB_MODE", "WANDB_ENTITY", "WANDB_BASE_URL",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "ISLANDS_STORAGE_RETRIES", "ISLANDS_STORAGE_RETRY_DELAY")
EXPOSED_WARNING = ("{names} will be in the Ray job's runtime_env: visible to anyone who can "
                   "open the cluster's Ray dashboard or run `ray job list` against it")


def job_env(forward: Sequence[str] = (), environ: Mapping[str, str] | None = None
            ) -> dict[str, str]:
    """The env_vars of a Ray job: the settings of FORWARDED_ENV set here, and every
    variable named in `forward`, which must be set here."""
    environ = os.environ if environ is None else environ
    env = {name: environ[name] for name in FORWARDED_ENV if name in environ}
    for name in forward:
        if name not in environ:
            raise InputError("--forward-env", f"{name} is not set in this environment "
                             "(expected the name of a variable to forward)")
        env[name] = environ[name]
    return env


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
    from orchestrator.control.cluster import how_to_add, island_nodes  # imports Ray

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


def submit_job(address: str, layout: RunLayout | None, working_dir: Path | None,
               command: list[str], name: str, env: dict[str, str]) -> str:
    """Submit `islands COMMAND` as a Ray job; with a run's layout, recorded in the run
    (status, logs and resume read it back)."""
    client = job_client(address)
    runtime_env: dict[str, Any] = {"py_modules": package_dirs(), "env_vars": env}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
    job_id = f"islands-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            client.submit_job(
                entrypoint=" ".join(["python", "-m", "orchestrator.cli.main", *command]),
                submission_id=job_id, runtime_env=runtime_env,
                metadata={"run": layout.root if layout else command[1]})
            break
        except RuntimeError as err:
            # A head that just started (or is busy) has no job agent yet: Ray says to retry.
            if "try again later" in str(err) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise InputError("--address", f"Ray did not take the job: {err}") from None
    if layout is None:
        return job_id
    storage.write_json(layout.submission, {"kind": "ray-job", "address": address,
                                           "job_id": job_id, "command": command,
                                           "submitted": round(time.time(), 3)})
    return job_id


def driver_log_file(layout: RunLayout) -> Path:
    """Where a background driver's output goes: the run's driver.log on a local disk; a
    cache file on this machine for a run on an object store, which has no append."""
    if layout.driver_log.startswith("file://"):
        return Path(layout.driver_log.removeprefix("file://"))
    return Path.home() / ".cache" / "islands" / "logs" / f"{Path(layout.root).name}.log"


def start_local(config: RunConfig, layout: RunLayout, working_dir: Path,
                command: list[str], wait: float = 120.0) -> int:
    """The driver in the background on this machine, its output in `driver_log_file`.
    Returns once the driver holds the run's lease, so a second submit is refused, not
    raced."""
    log_file = driver_log_file(layout)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        # One file for every driver of the run, each after a line of its own; `islands
        # logs` shows this driver's part, from the offset recorded below.
        offset = log.tell()
        log.write(f"==== islands {' '.join(command)}: driver started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
        log.flush()
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
            lines = log_file.read_text(errors="replace").strip().splitlines()
            raise InputError(layout.root, "the driver stopped at once: "
                             f"{lines[-1] if lines else 'no output'} (see {log_file})")
        time.sleep(0.2)
    # The log is recorded relative to the run (readers refuse any path leading out of it);
    # a cache file is not in the run, and readers find it by the same rule as here.
    in_run = layout.driver_log.startswith("file://")
    storage.write_json(layout.submission, {"kind": "local", "pid": process.pid,
                                           "log": "driver.log" if in_run else None,
                                           "log_offset": offset, "command": command,
                                           "submitted": round(time.time(), 3)})
    return process.pid


def submit_run(config: RunConfig, address: str | None, env: dict[str, str] | None = None
               ) -> tuple[RunLayout, str]:
    """Send `islands run` of this config; returns the run's layout and the job id (or pid).
    `env`: the Ray job's env_vars (default: `job_env()`); a background driver here inherits
    this environment instead."""
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
        return layout, submit_job(address, layout, folder, ["run", "config.yaml"], config.run,
                                  job_env() if env is None else env)
    return layout, str(start_local(config, layout, folder, ["run", "config.yaml"]))


def submit_resume(layout: RunLayout, config: RunConfig, address: str,
                  env: dict[str, str] | None = None) -> str:
    """`islands resume RUN` as a Ray job on the cluster."""
    check_not_running(config, layout)
    check_cluster(config, address)
    folder = Path(tempfile.mkdtemp(prefix="islands-submit-"))
    return submit_job(address, layout, folder, ["resume", layout.root, "--address", "auto"],
                      config.run, job_env() if env is None else env)


def resume_local(config: RunConfig, layout: RunLayout, force: bool = False) -> int:
    """`islands resume RUN` as a background driver here, as `islands submit` without an
    address started the run; returns its pid once it holds the lease."""
    check_not_running(config, layout)
    folder = Path(tempfile.mkdtemp(prefix="islands-submit-"))
    command = ["resume", layout.root, "--foreground", *(["--force"] if force else [])]
    return start_local(config, layout, folder, command)


@dataclass(frozen=True)
class Submission:
    """submission.json, checked. A run directory may come from someone else, so what it
    names is acted on only as far as the user allows: a log inside the run is read, a
    local pid is probed with signal 0, and a Ray dashboard is contacted only at the
    address the user gives (`--address`), never at the recorded one on its own: the client
    would send it this machine's Ray token."""
    kind: str  # "local" (a background driver) or "ray-job"
    pid: int = 0
    log: str | None = None  # inside the run; None: `driver_log_file`
    log_offset: int = 0  # where this driver's part of the log starts (earlier: drivers before)
    address: str = ""  # the dashboard the job was submitted to, as recorded
    job_id: str = ""

    def not_asked(self) -> str:
        """The one line said when the user gave no --address for a Ray job."""
        return (f"Ray job {self.job_id} not asked: its dashboard is contacted only when you "
                f"name it; add --address {self.address} (as submission.json records it)")


def read_submission(layout: RunLayout) -> Submission | None:
    """The run's submission.json, every field checked; None when it has none."""
    url = layout.submission
    try:
        record = storage.read_json(url)
    except FileNotFoundError:
        return None
    except ValueError:
        raise InputError(url, "not valid JSON") from None
    if not isinstance(record, dict):
        raise InputError(url, "expected an object")
    kind = record.get("kind")
    if kind == "local":
        pid = record.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise InputError(f"{url}: pid", f"expected a positive process id, got {pid!r}")
        log = record.get("log")
        if log == str(driver_log_file(layout)):
            log = None  # an absolute path, as written before: the file the rule finds
        if log is not None:
            log = check_path(log, f"{url}: log")
        offset = record.get("log_offset", 0)  # absent in records of older versions
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InputError(f"{url}: log_offset", f"expected a byte offset (an integer "
                             f">= 0), got {offset!r}")
        return Submission(kind, pid=pid, log=log, log_offset=offset)
    if kind == "ray-job":
        address, job_id = record.get("address"), record.get("job_id")
        if not isinstance(address, str) or not address.startswith(("http://", "https://")):
            raise InputError(f"{url}: address", f"expected the Ray dashboard's http(s) URL, "
                             f"got {address!r}")
        if not isinstance(job_id, str) or not job_id:
            raise InputError(f"{url}: job_id", f"expected a Ray job id, got {job_id!r}")
        return Submission(kind, address=address, job_id=job_id)
    raise InputError(f"{url}: kind", f"expected 'local' or 'ray-job', got {kind!r}")


def asked_address(record: Submission | None, address: str | None, run: str) -> str | None:
    """The dashboard to ask about the run's Ray job: the one the user named, if any."""
    if address is not None and (record is None or record.kind != "ray-job"):
        raise InputError("--address", f"{run} was not submitted as a Ray job: there is no "
                         "dashboard to ask")
    if address is not None and not address.startswith(("http://", "https://")):
        raise InputError("--address", f"expected the Ray dashboard's URL, like "
                         f"http://HEAD:8265 (got {address!r})")
    return address


def job_status(record: Submission | None, address: str | None = None) -> str | None:
    """RUNNING, SUCCEEDED, ... for a Ray job, asked of `address` (None: not asked, None
    returned); running/exited for a local driver."""
    if record is None:
        return None
    if record.kind == "local":
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return "exited"
        except PermissionError:
            return "running"
        return "running" if _not_zombie(record.pid) else "exited"
    if address is None:
        return None
    try:
        return str(job_client(address).get_job_status(record.job_id).value)
    except Exception as err:  # the head may be gone; status must still show the manifest
        return f"unknown ({type(err).__name__})"


def _not_zombie(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
