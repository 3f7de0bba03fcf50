"""Per-expert metrics: rows kept for Parquet in the run directory, and a wandb run.

wandb runs online when the user has a key (WANDB_API_KEY), offline otherwise; no account is
needed. Each expert is its own wandb run, grouped under the run's name.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from runstore import log_parts, storage


class MetricsLog:
    def __init__(self, url: str, resume_step: int) -> None:
        self.url = url
        self.rows: list[dict[str, Any]] = []
        if resume_step > 0 and storage.exists(url):
            # Keep only rows up to the checkpoint we resumed from: later ones will be redone.
            table = pq.read_table(io.BytesIO(storage.read_bytes(url)))
            self.rows = [row for row in table.to_pylist() if row["step"] <= resume_step]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self, rows: list[dict[str, Any]] | None = None) -> str | None:
        """Write `rows` (a copy of `self.rows` taken earlier, from a background writer) or
        the rows as they are now."""
        rows = self.rows if rows is None else rows
        if not rows:
            return None
        return storage.write_bytes(self.url, storage.parquet_bytes(pa.Table.from_pylist(rows)))


class ExpertLog:
    """An expert's log lines in the run directory, for `islands logs RUN --expert K`: each
    attempt writes its own parts (runstore/log_parts.py), opening with a header line, and
    never reads or rewrites what earlier attempts wrote."""

    def __init__(self, folder: str, attempt: int, header: str, enabled: bool = True) -> None:
        self.folder = folder
        self.attempt = attempt
        self.enabled = enabled
        self.seq = log_parts.next_seq(folder, attempt) if enabled else 1
        self.text = ""  # the open part
        self.written = 0  # of `text`, what its part on storage holds
        self.flushed = 0.0
        self.write(header)

    def write(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.text += f"{stamp} {line}\n"

    def flush(self, every: float = 0.0) -> None:
        """Write the open part, at most once per `every` seconds and only when it grew; a
        part that reached PART_BYTES is closed and the next lines start another."""
        if not self.enabled or len(self.text) == self.written \
                or time.monotonic() - self.flushed < every:
            return
        url = storage.join(self.folder, log_parts.part_name(self.attempt, self.seq))
        storage.write_bytes(url, self.text.encode())
        self.written = len(self.text)
        self.flushed = time.monotonic()
        if len(self.text) >= log_parts.PART_BYTES:
            self.seq += 1
            self.text, self.written = "", 0


def wandb_mode(setting: str) -> str:
    """`auto`: online when the user has a key (WANDB_API_KEY), offline otherwise. An explicit
    WANDB_MODE from the user wins over everything."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


class WandbRun:
    """An expert's wandb run, best effort: wandb down, unreachable or broken never fails
    training. Its first error is said once and turns tracking off for the attempt; the
    metrics still go to the run's Parquet (MetricsLog)."""

    def __init__(self, settings: dict[str, str], config: dict[str, Any],
                 warn: Callable[[str], None] = print) -> None:
        """`settings`: mode (offline/online/disabled), project, group, name, id, directory.

        A stable id with resume="allow" makes a restarted expert continue its own wandb run.
        """
        self.run: Any = None
        self.warn = warn
        if settings.get("mode", "disabled") == "disabled":
            return
        try:
            import wandb

            os.makedirs(settings["directory"], exist_ok=True)
            self.run = wandb.init(project=settings["project"], group=settings["group"],
                                  name=settings["name"], id=settings["id"], resume="allow",
                                  dir=settings["directory"],
                                  mode=wandb_mode(settings["mode"]),
                                  config=config,
                                  reinit="create_new",
                                  settings=wandb.Settings(silent=True, console="off",
                                                          x_disable_stats=True))
        except Exception as err:  # wandb's own errors, network errors, a bad directory
            self._failed("init", err)

    def _failed(self, call: str, error: Exception) -> None:
        self.run = None
        first_line = next(iter(str(error).splitlines()), "")
        self.warn(f"wandb {call} failed ({type(error).__name__}: {first_line[:200]}); "
                  "wandb is off for this attempt, metrics still go to metrics.parquet")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            try:
                self.run.log(metrics, step=step)
            except Exception as err:
                self._failed("log", err)

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as err:
                self._failed("finish", err)
