"""`islands islands FILE [--address ADDR]`: what the Ray cluster offers against what the
config asks for: each island, its live nodes, CPUs and accelerators, and what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from orchestrator.cli.common import console, handles_errors
from orchestrator.control.submit import cluster_nodes
from orchestrator.state.config import IslandSpec, load_config


def offered_nodes(config: Any, address: str | None) -> list[dict[str, Any]]:
    """Live nodes, through the dashboard (http://) or a Ray connection."""
    import ray

    from orchestrator.control.cluster import connect, disconnect

    if address and address.startswith(("http://", "https://")):
        return cluster_nodes(address)
    if address:
        config = config.model_copy(update={"islands": config.islands.model_copy(
            update={"address": address})})
    started = connect(config)
    try:
        return [node for node in ray.nodes() if node.get("Alive")]
    finally:
        if started:
            disconnect()


def accelerators(nodes: list[dict[str, Any]]) -> tuple[float, list[str]]:
    count = sum(node["Resources"].get("GPU", 0) for node in nodes)
    kinds = sorted({key.removeprefix("accelerator_type:") for node in nodes
                    for key in node["Resources"] if key.startswith("accelerator_type:")})
    return count, kinds


def shortfall(spec: IslandSpec, nodes: list[dict[str, Any]]) -> list[str]:
    """What the island's nodes lack against what the config says it has."""
    from orchestrator.control.cluster import ISLAND_PREFIX

    if not nodes:
        return ["missing"]
    problems = []
    cpus = sum(node["Resources"].get("CPU", 0) for node in nodes)
    if spec.cpus and cpus < spec.cpus:
        problems.append(f"{cpus:g} of {spec.cpus} CPUs")
    if spec.accelerators:
        count, kinds = accelerators(nodes)
        if count < spec.accelerators.count:
            problems.append(f"{count:g} of {spec.accelerators.count} GPUs")
        if spec.accelerators.type not in kinds:
            problems.append(f"no {spec.accelerators.type} (has {', '.join(kinds) or 'none'})")
    if not spec.node_labels:
        slots = sum(node["Resources"].get(ISLAND_PREFIX + spec.name, 0) for node in nodes)
        if slots < spec.slots:
            problems.append(f"{slots:g} of {spec.slots} slots")
    return problems


def asked(spec: IslandSpec) -> str:
    parts = [f"{spec.slots} slot(s) x {spec.data_parallel} worker(s)"]
    if spec.accelerators:
        a = spec.accelerators
        parts.append(f"{a.count} {a.type} {a.memory_gb:g} GB")
    if spec.cpus:
        parts.append(f"{spec.cpus} CPUs")
    parts.append(f"speed {spec.speed:g}" if spec.speed else "speed: calibrate")
    return ", ".join(parts)


@handles_errors
def islands(config_file: Path = typer.Argument(..., help="Run config (YAML)."),
            address: str | None = typer.Option(None, help="Ray address (HEAD:6379) or "
                                               "dashboard URL (http://HEAD:8265); default: "
                                               "the config's islands.address, else local.")
            ) -> None:
    """Show the islands the config asks for against those the Ray cluster offers."""
    from orchestrator.control.cluster import ISLAND_PREFIX, how_to_add, island_nodes

    config = load_config(config_file)
    where = address or config.islands.address
    nodes = offered_nodes(config, address)
    table = Table(title=f"islands for {config.run} ({where or 'embedded local Ray'})")
    for column in ("island", "found by", "asked", "nodes", "CPUs", "GPUs", "state"):
        table.add_column(column)
    missing = []
    specs = config.islands.specs()
    for spec in specs:
        found = island_nodes(spec, nodes)
        problems = shortfall(spec, found)
        if problems == ["missing"]:
            missing.append(spec)
        count, kinds = accelerators(found)
        by = ("labels " + ",".join(f"{k}={v}" for k, v in spec.node_labels.items())
              if spec.node_labels else f"resource {ISLAND_PREFIX}{spec.name}")
        table.add_row(spec.name, by, asked(spec),
                      " ".join(node.get("NodeManagerAddress", "?") for node in found) or "-",
                      f"{sum(node['Resources'].get('CPU', 0) for node in found):g}",
                      f"{count:g} {' '.join(kinds)}".strip() if count else "-",
                      "[red]" + "; ".join(problems) + "[/]" if problems else "[green]ok[/]")
    names = {spec.name for spec in specs}
    for name in sorted({key.removeprefix(ISLAND_PREFIX) for node in nodes
                        for key in node["Resources"] if key.startswith(ISLAND_PREFIX)} - names):
        table.add_row(name, f"resource {ISLAND_PREFIX}{name}", "-", "-", "-", "-", "unused")
    console.print(table)
    if missing:
        console.print(f"[red]missing from the cluster:[/] {', '.join(s.name for s in missing)}"
                      f"; add a node with: {how_to_add(missing[0])}", soft_wrap=True)
        raise typer.Exit(1)
