"""Placement of experts onto islands: a cost model and longest-processing-time-first."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import IslandSpec


@dataclass(frozen=True)
class ExpertWork:
    expert: int
    rows: int
    steps: int
    model_cost: float = 1.0  # relative cost of one sample through the model

    @property
    def cost(self) -> float:
        # A step costs the same whatever the shard size; rows only break ties, so the
        # larger shard (more epochs of data to see well) starts first.
        return self.steps * self.model_cost + 1e-9 * self.rows


def place(work: list[ExpertWork], islands: tuple[IslandSpec, ...]) -> dict[int, str]:
    """Assign each expert to the island where it would finish earliest, longest first.

    An island with `slots` trains that many experts at once, so its load is spread over
    its slots. Returns {expert: island name}.
    """
    if not islands:
        raise ValueError("no islands to place experts on")
    finish = {(spec.name, slot): 0.0 for spec in islands for slot in range(spec.slots)}
    speed = {spec.name: spec.speed for spec in islands}
    placement: dict[int, str] = {}
    for item in sorted(work, key=lambda w: (-w.cost, w.expert)):
        name, slot = min(finish, key=lambda key: (finish[key] + item.cost / speed[key[0]], key))
        finish[(name, slot)] += item.cost / speed[name]
        placement[item.expert] = name
    return placement


def makespan(work: list[ExpertWork], islands: tuple[IslandSpec, ...],
             placement: dict[int, str]) -> float:
    """Finish time of the busiest island when its experts share its slots evenly."""
    load = {spec.name: 0.0 for spec in islands}
    for item in work:
        load[placement[item.expert]] += item.cost
    return max(load[spec.name] / (spec.speed * spec.slots) for spec in islands)
