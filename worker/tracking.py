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

from runstore import storage


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
    """An expert's log lines in the run directory, for `islands logs RUN --expert K`: what
    earlier attempts wrote is kept, each attempt opens with a header line."""

    def __init__(self, url: str, header: str, enabled: bool = True) -> None:
        self.url = url
        self.enabled = enabled
        self.text = ""
        if enabled and storage.exists(url):
            self.text = storage.read_bytes(url).decode("utf-8", errors="replace")
        self.flushed = 0.0
        self.write(header)

    def write(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.text += f"{stamp} {line}\n"

    def flush(self, every: float = 0.0) -> None:
        """Rewrite the file, at most once per `every` seconds."""
        if not self.enabled or time.monotonic() - self.flushed < every:
            return
        storage.write_bytes(self.url, self.text.encode())
        self.flushed = time.monotonic()


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
