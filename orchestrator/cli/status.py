"""`islands status RUN [--watch]`: stages and experts as the manifest records them, live."""

from __future__ import annotations

import math
import textwrap
import time
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.cli.common import ASK_ADDRESS_HELP, console, handles_errors, open_run
from orchestrator.control.submit import asked_address, job_status, read_submission
from orchestrator.state.config import RunConfig
from orchestrator.state.lease import RunLease
from orchestrator.state.manifest import OPTIONAL_STAGES, STAGES, Manifest

FINISHED_JOB = ("SUCCEEDED", "FAILED", "STOPPED", "exited")
COLUMNS = ("expert", "island", "state", "step", "loss", "samp/s", "ETA", "tries",
           "last reason")
RIGHT = ("step", "loss", "samp/s", "tries")
REASON_WIDTH = 12  # the least the last column is given before it folds


@dataclass
class ExpertsTable:
    """One row per expert, laid out here rather than by rich's Table, which measures and
    wraps every cell (0.21 s of CPU for 256 experts, against 8 ms). Key columns never wrap;
    the last reason folds into the width left, so the table reads in 80 columns."""
    rows: list[tuple[str, ...]]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths = [max(len(column), *(len(row[i]) for row in self.rows))
                  for i, column in enumerate(COLUMNS[:-1])]
        left = sum(widths) + len(widths) + 1  # a space before the table and after each column
        room = max(options.max_width - left, REASON_WIDTH)

        def line(cells: tuple[str, ...]) -> str:
            laid = zip(cells, widths, COLUMNS[:-1], strict=True)
            return " " + " ".join(cell.rjust(width) if column in RIGHT else cell.ljust(width)
                                  for cell, width, column in laid)

        lines, widest = [], len(COLUMNS[-1])
        for row in self.rows:
            reason = textwrap.wrap(row[-1], room, break_long_words=True,
                                   break_on_hyphens=False) or [""]
            lines.append(f"{line(row[:-1])} {reason[0]}")
            lines.extend(" " * left + more for more in reason[1:])
            widest = max(widest, *(len(part) for part in reason))
        yield Text("experts", style="table.title")
        yield Text(f"{line(COLUMNS[:-1])} {COLUMNS[-1]}", style="table.header", no_wrap=True,
                   overflow="ignore")
        yield Text(" " + "\u2500" * (left + widest - 1), no_wrap=True, overflow="ignore")
        yield Text("\n".join(lines), no_wrap=True, overflow="ignore")


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
    # An optional stage (distill) shows once a verb has entered it.
    shown = [*STAGES, *(name for name in OPTIONAL_STAGES if name in manifest.data["stages"])]
    for name in shown:
        stages.add_column(name)
    stages.add_row(*(manifest.stage(name)["state"] for name in shown))
    rows = []
    keys = sorted(manifest.data["experts"], key=int)
    for key in keys:
        entry = manifest.data["experts"][key]
        attempts = entry["attempts"]
        state = entry["state"]
        if state == "pending" and not attempts and manifest.stage("experts")["state"] \
                == "running":
            state = "queued"
        rows.append((
            "seed" if int(key) < 0 else key, entry.get("island", "-"), state,
            f"{entry['step']}/{entry.get('total', config.experts.steps)}",
            number(entry.get("loss", entry.get("final_loss")), ".4f"),
            number(entry.get("samples_per_s"), ".0f"), eta(entry, config.experts.batch_size),
            str(len(attempts)), attempts[-1].get("reason", "-") if attempts else "-"))
    return Group(stages, ExpertsTable(rows))


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
