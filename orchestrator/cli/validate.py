"""`islands validate FILE`: check a config without running anything."""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.cli.common import console, handles_errors
from orchestrator.state.config import load_config


@handles_errors
def validate(config_file: Path = typer.Argument(..., help="Run config (YAML).")) -> None:
    """Check a config file: unknown keys and wrong types are named with their dotted path;
    the data is reached and its columns, types and splits checked (never its rows)."""
    from orchestrator.modalities import check_config

    config = load_config(config_file)
    spec = check_config(config)  # a registered modality that can train what the config asks
    data = spec.describe_data(config)  # footers or a listing: reachable, columns, splits
    console.print(f"[green]ok[/]: {config_file} (run {config.run!r}, {config.clusters} "
                  f"expert(s), storage {config.storage})")
    console.print(f"data: {data}", highlight=False, soft_wrap=True, markup=False)
