"""`islands status RUN [--watch]`: stages and experts as the manifest records them, live."""

from __future__ import annotations

import math
import time
from typing import Any

import typer
from rich import box
from rich.console import Group
from rich.live import Live
from rich.table import Table

from orchestrator.cli.common import ASK_ADDRESS_HELP, console, handles_errors, open_run
from orchestrator.control.submit import asked_address, job_status, read_submission
from orchestrator.state.config import RunConfig
from orchestrator.state.lease import RunLease
from orchestrator.state.manifest import STAGES, Manifest

FINISHED_JOB = ("SUCCEEDED", "FAILED", "STOPPED", "exited")


def eta(entry: dict[str, Any], batch: int) -> str:
    rate = entry.get("samples_per_s") or 0.0
    left = entry.get("total", entry["step"]) - entry["step"]
    if entry["state"] != "running" or rate <= 0 or left <= 0:
        return "-"
    seconds = left * batch / rate
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else \
        f"{seconds / 86400:.1f} d"


def number(value: Any, form: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, form)


def driver(config: RunConfig, manifest: Manifest) -> str | None:
    lease = RunLease(manifest.layout, config.fault_tolerance.lease_seconds).live_holder()
    if lease:
        return f"driver pid {lease['pid']} on {lease['host']}"
    return None


def tables(config: RunConfig, manifest: Manifest, job: str | None) -> Group:
    holder = driver(config, manifest) or "no driver running"
    title = f"run {config.run}: {holder}" + (f", submitted: {job}" if job else "")
    stages = Table(title=title, title_justify="left")
    for name in STAGES:
        stages.add_column(name)
    stages.add_row(*(manifest.stage(name)["state"] for name in STAGES))
    experts = Table(title="experts", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                    padding=(0, 1, 0, 0))
    # Short headers and unwrapped key columns: the table must read in 80 columns.
    for column in ("expert", "island", "state", "step", "loss", "samp/s", "ETA",
                   "tries", "last reason"):
        experts.add_column(column, justify="right" if column in (
            "step", "loss", "samp/s", "tries") else "left",
            no_wrap=column != "last reason", overflow="fold")
    keys = sorted(manifest.data["experts"], key=int)
    for key in keys:
        entry = manifest.data["experts"][key]
        attempts = entry["attempts"]
        state = entry["state"]
        if state == "pending" and not attempts and manifest.stage("experts")["state"] \
                == "running":
            state = "queued"
        experts.add_row(
            "seed" if int(key) < 0 else key, entry.get("island", "-"), state,
            f"{entry['step']}/{entry.get('total', config.experts.steps)}",
            number(entry.get("loss", entry.get("final_loss")), ".4f"),
            number(entry.get("samples_per_s"), ".0f"), eta(entry, config.experts.batch_size),
            str(len(attempts)), attempts[-1].get("reason", "-") if attempts else "-")
    return Group(stages, experts)


def finished(config: RunConfig, manifest: Manifest, job: str | None) -> bool:
    """A submitted run ends with its job or background driver; any other with its lease."""
    if job is not None:
        return job.split(" ")[0] in FINISHED_JOB
    return driver(config, manifest) is None


@handles_errors
def status(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
           watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until the run's "
                                      "driver ends (Ctrl-C stops watching, not the run)."),
           interval: float = typer.Option(2.0, help="Seconds between refreshes."),
           address: str | None = typer.Option(None, help=ASK_ADDRESS_HELP)) -> None:
    """Each stage's state; each expert's island, state, step/total, loss, samples/s, ETA,
    attempts and last reason."""
    config, manifest = open_run(run)
    record = read_submission(manifest.layout)
    address = asked_address(record, address, run)
    if record is not None and record.kind == "ray-job" and address is None:
        # Without the job's state, --watch ends with the driver's lease.
        console.print(record.not_asked(), markup=False, highlight=False, soft_wrap=True)
    if not watch:
        console.print(tables(config, manifest, job_status(record, address)))
        return
    with Live(tables(config, manifest, job_status(record, address)), console=console,
              refresh_per_second=1) as live:
        while True:
            job = job_status(record, address)
            manifest = Manifest.load(manifest.layout)
            live.update(tables(config, manifest, job))
            if finished(config, manifest, job):
                break
            time.sleep(interval)
