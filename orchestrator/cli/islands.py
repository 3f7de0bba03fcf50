"""`islands islands FILE [--address ADDR]`: what the Ray cluster offers against what the
config asks for: each island, its live nodes, CPUs and accelerators, and what is missing."""

from __future__ import annotations

from pathlib import Path

import ray
import typer
from rich.table import Table

from orchestrator.cli.common import console, handles_errors
from orchestrator.cluster import ISLAND_PREFIX, connect
from orchestrator.config import load_config


def nodes_by_island() -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        for name in resources:
            if name.startswith(ISLAND_PREFIX):
                found.setdefault(name.removeprefix(ISLAND_PREFIX), []).append(node)
    return found


@handles_errors
def islands(config_file: Path = typer.Argument(..., help="Run config (YAML)."),
            address: str | None = typer.Option(None, help="Ray address (default: the "
                                               "config's islands.address, else local).")
            ) -> None:
    """Show the islands the config asks for against those the Ray cluster offers."""
    config = load_config(config_file)
    if address:
        config = config.model_copy(update={"islands": config.islands.model_copy(
            update={"address": address})})
    started = connect(config)
    try:
        offered = nodes_by_island()
    finally:
        if started:
            ray.shutdown()
    table = Table(title=f"islands for {config.run} "
                        f"({config.islands.address or 'embedded local Ray'})")
    for column in ("island", "asked", "nodes", "CPUs", "accelerators", "slots"):
        table.add_column(column)
    asked = {spec.name: spec for spec in config.islands.specs()}
    for name in sorted(set(asked) | set(offered)):
        nodes = offered.get(name, [])
        cpus = sum(node["Resources"].get("CPU", 0) for node in nodes)
        gpus = sum(node["Resources"].get("GPU", 0) for node in nodes)
        kinds = sorted({key.removeprefix("accelerator_type:") for node in nodes
                        for key in node["Resources"] if key.startswith("accelerator_type:")})
        slots = sum(node["Resources"].get(ISLAND_PREFIX + name, 0) for node in nodes)
        table.add_row(name, "yes" if name in asked else "no (unused)",
                      str(len(nodes)) if nodes else "[red]missing[/]", f"{cpus:g}",
                      f"{gpus:g} GPU {' '.join(kinds)}".strip() if gpus else "-",
                      f"{slots:g}")
    console.print(table)
    missing = [name for name in asked if name not in offered]
    if missing:
        console.print(f"[red]missing from the cluster:[/] {', '.join(missing)}: start a node "
                      "with --resources '{\"island:<name>\": <slots>}'")
        raise typer.Exit(1)
