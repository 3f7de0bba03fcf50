"""`islands run FILE`: every stage, resuming whatever is already done."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from orchestrator.cli.common import console, handles_errors
from orchestrator.state.config import load_config
from orchestrator.state.manifest import STAGES
from runstore.errors import InputError


@handles_errors
def run(config_file: Path = typer.Argument(..., help="Run config (YAML)."),
        until: str = typer.Option("eval", help="Stop after this stage: partition, seed, "
                                  "experts, router or eval."),
        force: bool = typer.Option(False, help="Take over the lease of a driver that died "
                                   "(an expired lease).")) -> None:
    """Partition, train experts on islands, train the router, evaluate. On an existing run,
    continue it: what is done and verified is skipped."""
    if until not in STAGES:
        raise InputError("--until", f"expected one of {', '.join(STAGES)}, got {until!r}")
    from orchestrator.pipeline import run_pipeline

    config = load_config(config_file)
    started = time.perf_counter()
    run_pipeline(config, console, until=until, force=force)
    console.print(f"wall time {time.perf_counter() - started:.1f}s")


@handles_errors
def partition(config_file: Path = typer.Argument(..., help="Run config (YAML).")) -> None:
    """Run the partition stage alone."""
    from orchestrator.pipeline import run_pipeline

    run_pipeline(load_config(config_file), console, until="partition")
