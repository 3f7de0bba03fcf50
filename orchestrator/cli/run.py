"""`islands run FILE`: every stage, resuming whatever is already done."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from orchestrator.cli.common import console, handles_errors
from orchestrator.config import load_config
from orchestrator.pipeline import run_pipeline


@handles_errors
def run(config_file: Path = typer.Argument(..., help="Run config (YAML)."),
        until: str = typer.Option("eval", help="Stop after this stage: partition, experts, "
                                  "router or eval.")) -> None:
    """Partition, train experts on islands, train the router, evaluate."""
    config = load_config(config_file)
    started = time.perf_counter()
    run_pipeline(config, console, until=until)
    console.print(f"wall time {time.perf_counter() - started:.1f}s")


@handles_errors
def partition(config_file: Path = typer.Argument(..., help="Run config (YAML).")) -> None:
    """Run the partition stage alone."""
    run_pipeline(load_config(config_file), console, until="partition")
