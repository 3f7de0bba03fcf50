"""The training protocol that scripts/replicate_ddm.py and scripts/replicate_cbtm.py share.

Every arm takes the same S optimizer steps, BTM's seed model the first S/4 of them, and every
run keeps snapshots at S/16, S/8, S/4, S/2 and S. Here: those points and where each arm's
weights for them are, an arm's run through the pipeline up to the router, its run config's
common part, the command-line options both scripts take, the comparison table and gap plot
both draw, and the writing of the report.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from orchestrator.control.cluster import connect, disconnect
from orchestrator.ensemble.snapshots import snapshot_steps
from orchestrator.evaluate.pictures import figure_png
from orchestrator.pipeline import run_pipeline
from orchestrator.state.config import parse_config
from orchestrator.state.manifest import Manifest
from runstore import storage

POINTS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # snapshot fractions of S, every arm
POINT_NAMES = ("S/16", "S/8", "S/4", "S/2", "S")
BTM_SEED = 1 / 4  # the BTM seed's share of S
# Fractions of each BTM run's own steps that land on POINTS: the seed (S/4 steps) at 1/4,
# 1/2, 1 -> S/16, S/8, S/4; its experts (3S/4 steps) at 1/3, 1 -> S/2, S.
BTM_SNAPSHOTS = (1 / 4, 1 / 3, 1 / 2, 1.0)
ROUTINGS = ("top1", "full", "oracle")
WEIGHTS = ("ema", "raw")


class ProtocolArm(Protocol):
    """What the shared steps read of a script's arm."""

    name: str
    clusters: int  # experts; 1 for a single model
    method: str  # the partition: kmeans or random
    steps: int  # each expert's own steps (BTM: after the seed)
    batch: int
    seed_steps: int
    seed_batch: int | None
    manifest: Manifest | None

    @property
    def ensemble(self) -> bool: ...


def run_config(arm: ProtocolArm, run: str, storage_url: str, args: argparse.Namespace, *,
               data: dict[str, Any], model: dict[str, Any], threads: int,
               router: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An arm's run config: the protocol's steps, batch, schedule and snapshots, with the
    script's data, model, worker threads and router (and any further sections)."""
    experts: dict[str, Any] = {
        "monolith": not arm.ensemble, "steps": arm.steps, "batch_size": arm.batch,
        "lr": args.lr, "lr_schedule": "constant", "warmup_steps": args.warmup,
        "ema_decay": args.ema_decay, **model,
        "snapshot_at": list(BTM_SNAPSHOTS if arm.seed_steps else POINTS),
        "checkpoint_every": max(arm.steps // 2, 1), "keep_checkpoints": 1,
        "log_every": args.log_every, "threads": threads}
    if arm.seed_steps:
        experts.update(seed_steps=arm.seed_steps, seed_batch_size=arm.seed_batch)
    return {
        "run": run, "storage": storage_url, "seed": args.seed, "data": data,
        "partition": {"clusters": arm.clusters, "method": arm.method},
        "experts": experts, "router": router,
        "islands": {"local": args.islands},
        "tracking": {"wandb": "disabled"},
        **extra,
    }


def train_until_router(config: dict[str, Any], console: Console
                       ) -> tuple[Manifest, float, float]:
    """Run the pipeline up to the router (the scripts' scoring replaces the eval stage):
    the run's manifest, its wall seconds, and its training FLOPs per sample."""
    started = time.perf_counter()
    manifest = run_pipeline(parse_config(config), console, until="router")
    wall = time.perf_counter() - started
    meta = storage.read_json(storage.join(manifest.layout.final(0), "meta.json"))
    return manifest, wall, meta["train_flops"] / meta["samples_seen"]


@contextmanager
def one_ray(config: dict[str, Any]) -> Iterator[None]:
    """One Ray for every arm: started for the block unless one is already up."""
    started_ray = connect(parse_config(config))
    try:
        yield
    finally:
        if started_ray:
            disconnect()


def step_at(fraction: float, steps: int) -> int:
    """The step `experts.snapshot_at` puts a fraction at (worker.train.snapshot_steps)."""
    return min(steps, max(1, round(fraction * steps)))


@dataclass
class Point:
    """Where one point's weights are in an arm's run."""

    fraction: float
    name: str
    snapshot_step: int  # the step of the snapshot, in its own run
    step: int  # the step in the whole protocol (BTM: the seed's steps included)
    experts: list[int]  # [-1]: BTM's seed model
    seeded: bool  # BTM's seed model, before its experts branch


def snapshot_points(arm: ProtocolArm) -> Iterator[Point]:
    """Each point's snapshot, checked to be there: BTM's up to S/4 are its seed model's."""
    assert arm.manifest is not None
    for fraction, name in zip(POINTS, POINT_NAMES, strict=True):
        if arm.seed_steps and fraction <= BTM_SEED:  # still the seed model
            step = step_at(fraction / BTM_SEED, arm.seed_steps)
            point = Point(fraction, name, step, step, [-1], True)
        else:
            own = (fraction - BTM_SEED) / (1 - BTM_SEED) if arm.seed_steps else fraction
            step = step_at(own, arm.steps)
            point = Point(fraction, name, step, arm.seed_steps + step,
                          list(range(arm.clusters)), False)
        for expert in point.experts:
            if step not in snapshot_steps(arm.manifest, expert):
                raise RuntimeError(f"{arm.name}: expert {expert} has no snapshot at step {step}")
        yield point


def logged_losses(manifest: Manifest, expert: int) -> list[dict[str, Any]]:
    """The rows the trainer logged for an expert (step, loss, ...)."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(manifest.layout.metrics(expert))))
    return table.to_pylist()


def log_crossing(before: dict[str, float], after: dict[str, float], key: str) -> float:
    """Where the gap goes through zero between two rows, interpolated in log `key`."""
    share = before["gap"] / (before["gap"] - after["gap"])
    return math.exp(math.log(before[key]) + share * (
        math.log(after[key]) - math.log(before[key])))


def relative_cell(row: dict[str, float]) -> str:
    """A gap relative to the baseline, +- two standard errors, in %."""
    return f"{100 * row['relative']:+.1f}% +- {200 * row['relative_se']:.1f}"


def gap_table(title: str, comparisons: dict[str, list[dict[str, float]]],
              caption: str) -> Table:
    """A row per comparison, a column per point, each cell `relative_cell`."""
    table = Table(title=title)
    table.add_column("comparison")
    for name in POINT_NAMES:
        table.add_column(name, justify="right")
    for label, rows in comparisons.items():
        table.add_row(label, *(relative_cell(r) for r in rows))
    table.caption = caption
    return table


def plot_gap(axis: Any, rows: list[dict[str, float]], color: str, label: str) -> None:
    """A gap against training FLOPs with its band of two standard errors."""
    x = [r["flops"] for r in rows]
    y = np.array([r["gap"] for r in rows])
    band = 2 * np.array([r["se"] for r in rows])
    axis.plot(x, y, marker="o", color=color, label=label)
    axis.fill_between(x, y - band, y + band, color=color, alpha=0.2)


def save_png(figure: Any, out: Path, name: str) -> str:
    """The figure as <out's stem>-<name>.png beside `out`."""
    path = out.with_name(f"{out.stem}-{name}.png")
    path.write_bytes(figure_png(figure))
    return str(path)


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=None,
                        help="Warm-up steps of every run (default: S/16).")
    parser.add_argument("--ema-decay", type=float, default=0.999)


def add_run_arguments(parser: argparse.ArgumentParser, out: str, pictures: str,
                      quick: str) -> None:
    """--log-every, --seed, --storage, --out (default `out`, the PNGs named as `pictures`)
    and --quick (`quick` its help)."""
    parser.add_argument("--log-every", type=int, default=None,
                        help="Train-loss logging interval (default: S/16, so every snapshot "
                             "has its logged loss).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default=None, help="Where runs go (default: a temp dir).")
    parser.add_argument("--out", default=out,
                        help=f"The JSON; the PNGs go beside it ({pictures}).")
    parser.add_argument("--quick", action="store_true", help=quick)


def check_steps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """S a multiple of 16; the warm-up and the logging interval S/16 where not given."""
    if args.steps % 16:
        parser.error("--steps: a multiple of 16 (snapshots at S/16 ... S, BTM's seed at S/4)")
    args.warmup = args.steps // 16 if args.warmup is None else args.warmup
    args.log_every = args.log_every or args.steps // 16


def wide_console(width: int) -> Console:
    """The terminal's console; in a log file, one `width` wide: room for the wide tables."""
    console = Console()
    return console if console.is_terminal else Console(width=width)


def storage_for(args: argparse.Namespace, prefix: str) -> str:
    """--storage, or a new temp dir."""
    return args.storage or f"file://{tempfile.mkdtemp(prefix=prefix)}"


def write_report(out: Path, report: dict[str, Any], pictures: list[str], storage_url: str,
                 wall: float, console: Console) -> None:
    """The report as JSON at `out`, and a line saying what was written where."""
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out} and {', '.join(pictures)}; runs in {storage_url}; "
                  f"{wall / 60:.1f} min in all")
