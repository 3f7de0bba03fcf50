"""`islands resume RUN`: continue a run whose driver stopped, from what is on storage."""

from __future__ import annotations

import time

import typer

from orchestrator.cli.common import console, handles_errors, open_run
from orchestrator.pipeline import run_pipeline
from runstore.storage import join


@handles_errors
def resume(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
           force: bool = typer.Option(False, help="Take over the lease of a driver that "
                                      "died (an expired lease).")) -> None:
    """Verify finished stages and experts (sha256), skip them, continue the rest from their
    last good checkpoints."""
    config, manifest = open_run(run)
    parent = manifest.layout.root.rsplit("/", 1)[0]
    config = config.model_copy(update={"storage": parent})
    assert join(parent, config.run) == manifest.layout.root, "run folder is named after the run"
    started = time.perf_counter()
    run_pipeline(config, console, force=force)
    console.print(f"wall time {time.perf_counter() - started:.1f}s")
