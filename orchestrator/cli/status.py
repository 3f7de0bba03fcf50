"""`islands status RUN`: stages and experts as the manifest records them."""

from __future__ import annotations

import typer
from rich.table import Table

from orchestrator.cli.common import console, handles_errors, open_run


@handles_errors
def status(run: str = typer.Argument(..., help="Run directory (path or fsspec URL).")) -> None:
    """Show each stage and expert: state, island, step, attempts."""
    config, manifest = open_run(run)
    stages = Table(title=f"run {config.run}: stages")
    stages.add_column("stage")
    stages.add_column("state")
    for name, entry in manifest.data["stages"].items():
        stages.add_row(name, entry["state"])
    experts = Table(title="experts")
    for column in ("expert", "state", "island", "step", "attempts", "last reason"):
        experts.add_column(column)
    for k in manifest.experts:
        entry = manifest.expert(k)
        attempts = entry["attempts"]
        experts.add_row(str(k), entry["state"], entry.get("island", "-"),
                        f"{entry['step']}/{config.experts.steps}", str(len(attempts)),
                        attempts[-1].get("reason", "-") if attempts else "-")
    console.print(stages)
    console.print(experts)
