"""`islands validate FILE`: check a config without running anything."""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.cli.common import console, handles_errors
from orchestrator.state.config import load_config


@handles_errors
def validate(config_file: Path = typer.Argument(..., help="Run config (YAML).")) -> None:
    """Check a config file: unknown keys and wrong types are named with their dotted path."""
    from orchestrator.modalities import check_config

    config = load_config(config_file)
    check_config(config)  # a registered modality that can train what the config asks
    console.print(f"[green]ok[/]: {config_file} (run {config.run!r}, {config.clusters} "
                  f"expert(s), storage {config.storage})")
