"""The ensemble engine every modality shares: route, group the rows by expert, run each
expert once on exactly its rows, combine.

What differs between modalities comes in from the modality's spec: the router (inputs ->
probabilities over experts) and the combine rule (images: the router-weighted sum of
velocities; text: the log-space mixture of next-byte distributions). Each row carries its
own routing (strategy and k), so one call serves a batch of independent requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from orchestrator.ensemble.strategies import check_strategy


@dataclass(frozen=True)
class Routing:
    """How one request mixes the experts."""

    strategy: str = "top1"
    top_k: int = 2


@dataclass
class ExpertPart:
    """One expert's share of a batch: the rows it ran on (ascending), its output on them and
    each row's mixture weight. `dense`: every row of the batch, in order."""

    expert: int
    rows: torch.Tensor
    output: torch.Tensor
    weight: torch.Tensor
    dense: bool


class Combine(Protocol):
    def __call__(self, batch: int, parts: list[ExpertPart],
                 inputs: tuple[torch.Tensor, ...]) -> torch.Tensor: ...


Router = Callable[..., torch.Tensor]  # routing inputs -> probabilities [B, K]
RunExpert = Callable[..., torch.Tensor]  # (expert, *its rows of the inputs) -> its output
ExpertCall = tuple[int, tuple[torch.Tensor, ...]]  # (expert index, its rows of the inputs)
# Runs a step's expert calls and returns their outputs in order: in turn here, or all at
# once on experts that live elsewhere (a server's expert deployments).
Dispatch = Callable[[RunExpert, list[ExpertCall]], list[torch.Tensor]]


class NoHealthyExpert(RuntimeError):
    """Every expert is down: nothing left to route to."""


class ExpertsDown(RuntimeError):
    """A dispatch whose expert calls failed: it has marked those experts down, so the step
    can be taken again, routed over the others."""

    def __init__(self, experts: list[int]) -> None:
        super().__init__(f"experts {experts} did not answer")
        self.experts = experts


def call_expert(expert: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return expert(*inputs)


class Ensemble:
    def __init__(self, experts: Sequence[nn.Module], router: Router | None,
                 combine: Combine) -> None:
        if len(experts) > 1 and router is None:
            raise ValueError("an ensemble of several experts needs a router")
        self.experts = list(experts)
        self.router = router
        self.combine = combine
        self.expert_rows = 0  # expert forward passes, counted per row: the cost of inference
        # Experts that cannot answer now: the router renormalises over the others.
        self.down: frozenset[int] = frozenset()
        self.dispatch: Dispatch | None = None

    @property
    def clusters(self) -> int:
        return len(self.experts)

    @torch.no_grad()
    def probabilities(self, *route_inputs: Any) -> torch.Tensor:
        if self.router is None:
            return torch.ones(len(route_inputs[0]), 1)
        return self.router(*route_inputs)

    def weights(self, probs: torch.Tensor, routing: Routing | Sequence[Routing]) -> torch.Tensor:
        """Mixture weights; one routing for every row, or one per row. Experts that are
        down get none: the probabilities are renormalised over the rest first."""
        if self.down:
            up = torch.ones(probs.shape[1], dtype=probs.dtype)
            up[sorted(self.down)] = 0
            if not up.any():
                raise NoHealthyExpert("every expert is down")
            probs = probs * up
            probs = probs / probs.sum(1, keepdim=True)
        if not isinstance(routing, Routing) and len(set(routing)) == 1:
            routing = routing[0]  # every row alike: one strategy call over the batch
        if isinstance(routing, Routing):
            return check_strategy(routing.strategy)(probs, routing.top_k)
        if len(routing) != len(probs):
            raise ValueError(f"{len(routing)} routings for {len(probs)} rows")
        weights = torch.zeros_like(probs)
        groups: dict[Routing, list[int]] = {}
        for row, each in enumerate(routing):
            groups.setdefault(each, []).append(row)
        for each, rows in groups.items():  # strategies are row-wise: a group at a time
            index = torch.tensor(rows)
            weights[index] = check_strategy(each.strategy)(probs[index], each.top_k)
        return weights

    def route(self, route_inputs: tuple[Any, ...],
              routing: Routing | Sequence[Routing]) -> torch.Tensor:
        return self.weights(self.probabilities(*route_inputs), routing)

    @torch.no_grad()
    def mix(self, weights: torch.Tensor, inputs: tuple[torch.Tensor, ...],
            run: RunExpert = call_expert) -> torch.Tensor:
        """Run each expert once on the rows that give it weight, then combine."""
        batch = weights.shape[0]
        experts, rows = weights.t().nonzero().unbind(1)  # (expert, row) pairs, by expert
        self.expert_rows += len(rows)
        if len(rows) and len(rows) == weights.numel():  # every expert on every row: no gather
            every = torch.arange(batch)
            outputs = self.run_calls(run, [(k, inputs) for k in range(self.clusters)])
            parts = [ExpertPart(k, every, output, weights[:, k], True)
                     for k, output in enumerate(outputs)]
            return self.combine(batch, parts, inputs)
        # One gather for all experts; each runs once on its contiguous slice of it.
        counts = torch.bincount(experts, minlength=self.clusters).tolist()
        pieces = [part.index_select(0, rows).split(counts) for part in inputs]
        row_groups = rows.split(counts)
        weight_groups = weights[rows, experts].split(counts)
        used = [k for k in range(self.clusters) if counts[k]]
        outputs = self.run_calls(run, [(k, tuple(piece[k] for piece in pieces)) for k in used])
        parts = [ExpertPart(k, row_groups[k], output, weight_groups[k], False)
                 for k, output in zip(used, outputs, strict=True)]
        return self.combine(batch, parts, inputs)

    def run_calls(self, run: RunExpert, calls: list[ExpertCall]) -> list[torch.Tensor]:
        if self.dispatch is not None:
            return self.dispatch(run, calls)
        return [run(self.experts[k], *inputs) for k, inputs in calls]
