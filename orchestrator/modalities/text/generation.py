"""c-BTM on the ensemble engine: p(y | x) = sum_k w_k p_k(y | x), mixed in log space, the
weights from the distance of the prompt's embedding to the cluster centres; generation of a
batch of independent requests (each with its own routing, seed and temperature), one engine
call per new byte."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from orchestrator.ensemble import Ensemble, ExpertPart, Routing
from orchestrator.ensemble.experts import load_experts
from orchestrator.modalities.text.router import CentroidRouter
from orchestrator.state.manifest import Manifest
from runstore.errors import InputError
from worker.models.byte_lm import EOS, PAD, decode, encode


def mix_log_probs(batch: int, parts: list[ExpertPart],
                  inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """log sum_k w_k p_k(y | x) from each expert's logits on its rows."""
    mixed = None
    for part in parts:
        log_p = torch.log_softmax(part.output.float(), dim=-1)
        log_p = log_p + part.weight.log().view(-1, *([1] * (log_p.dim() - 1)))
        if mixed is None:
            mixed = torch.full((batch, *log_p.shape[1:]), float("-inf"))
        mixed[part.rows] = torch.logaddexp(mixed[part.rows], log_p)
    assert mixed is not None, "no expert had weight"
    return mixed


def last_logits(expert: nn.Module, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Each row's logits at its own last position (rows are right-padded; the model is
    causal, so padding after a position never changes it)."""
    return expert(tokens)[torch.arange(len(tokens)), last]


def log_probs(ensemble: Ensemble, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log p(next token) under the mixture at every position: [B, T, V]."""
    return ensemble.mix(weights, (tokens,))


def check_prompt(prompt: str, context: int) -> list[int]:
    tokens = encode(prompt)
    if len(tokens) > context:
        raise InputError("--prompt", f"{len(tokens) - 1} bytes but the experts' context is "
                         f"{context - 1} bytes (plus BOS); shorten it")
    return tokens


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    routing: Routing = field(default_factory=Routing)
    max_new_tokens: int = 200
    temperature: float = 0.8
    seed: int = 0
    refresh_every: int = 0  # re-route on the text so far every N new bytes (0: never)


@dataclass
class Continuation:
    """One request in flight: its tokens, the bytes added, and every routing it used."""

    request: GenerateRequest
    tokens: list[int]
    generator: torch.Generator
    probs: torch.Tensor  # [K], the router's probabilities for the text so far
    weights: torch.Tensor  # [K], the current routing
    history: list[torch.Tensor]
    new: list[int] = field(default_factory=list)
    finished: bool = False
    routed_at: int = 0  # len(new) when last routed

    @property
    def stopped(self) -> bool:
        """Ended by EOS rather than by max_new_tokens."""
        return self.finished and len(self.new) < self.request.max_new_tokens

    @property
    def text(self) -> str:
        return decode(self.new)


class Decoding:
    """Requests in flight; `step()` adds one byte to unfinished ones in one engine call:
    windows right-padded to the longest, each row read at its own last position. Requests
    join between steps (`add`) and leave once finished (`retire`)."""

    def __init__(self, ensemble: Ensemble, context: int,
                 requests: Sequence[GenerateRequest] = ()) -> None:
        self.ensemble = ensemble
        self.context = context
        self.items: list[Continuation] = []
        self.add(requests)

    def add(self, requests: Sequence[GenerateRequest]) -> list[Continuation]:
        """Join requests, also between two steps of the others; routed together."""
        if not requests:
            return []
        tokens = [check_prompt(request.prompt, self.context) for request in requests]
        probs = self.ensemble.probabilities([r.prompt for r in requests])
        weights = self.ensemble.weights(probs, [r.routing for r in requests])
        added = [Continuation(request, tokens[i], torch.Generator().manual_seed(request.seed),
                              probs[i], weights[i], [weights[i]],
                              finished=request.max_new_tokens == 0)
                 for i, request in enumerate(requests)]
        self.items.extend(added)
        return added

    def retire(self, items: Sequence[Continuation]) -> None:
        """Forget requests (finished, or whose client left)."""
        gone = {id(item) for item in items}
        self.items = [item for item in self.items if id(item) not in gone]

    @property
    def finished(self) -> bool:
        return all(item.finished for item in self.items)

    def _refresh(self, active: list[Continuation]) -> None:
        due = [item for item in active if item.request.refresh_every and item.new
               and len(item.new) % item.request.refresh_every == 0
               and item.routed_at != len(item.new)]
        if due:
            probs = self.ensemble.probabilities([item.request.prompt + item.text
                                                 for item in due])
            weights = self.ensemble.weights(probs, [item.request.routing for item in due])
            for item, p, row in zip(due, probs, weights, strict=True):
                item.probs, item.weights, item.routed_at = p, row, len(item.new)
                item.history.append(row)

    @torch.no_grad()
    def step(self, items: Sequence[Continuation] | None = None) -> None:
        """One byte for each of `items` (default: every unfinished one). A failed expert
        call raises before any request moves, so the step can be taken again."""
        active = [item for item in (self.items if items is None else items)
                  if not item.finished]
        if not active:
            return
        self._refresh(active)
        windows = [item.tokens[-self.context :] for item in active]
        tokens = torch.full((len(windows), max(map(len, windows))), PAD, dtype=torch.long)
        for row, window in enumerate(windows):
            tokens[row, : len(window)] = torch.tensor(window)
        last = torch.tensor([len(window) - 1 for window in windows])
        if self.ensemble.down:  # routed again over the experts that are up
            weights = self.ensemble.weights(torch.stack([item.probs for item in active]),
                                            [item.request.routing for item in active])
        else:
            weights = torch.stack([item.weights for item in active])
        mixed = self.ensemble.mix(weights, (tokens, last), run=last_logits)
        for item, log_p in zip(active, mixed, strict=True):
            log_p[PAD] = float("-inf")
            temperature = item.request.temperature
            if temperature == 0:
                token = int(log_p.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(log_p / temperature, -1), 1,
                                              generator=item.generator))
            if token == EOS:
                item.finished = True
                continue
            item.tokens.append(token)
            item.new.append(token)
            item.finished = len(item.new) >= item.request.max_new_tokens

    def run(self) -> list[Continuation]:
        while not self.finished:
            self.step()
        return self.items


def generate(ensemble: Ensemble, context: int,
             request: GenerateRequest) -> tuple[str, list[torch.Tensor]]:
    """Continue one prompt; returns the new text and the routing weights used."""
    item = Decoding(ensemble, context, [request]).run()[0]
    return item.text, item.history


def load_centroid_router(manifest: Manifest, clusters: int,
                         temperature: float) -> CentroidRouter | None:
    return CentroidRouter.from_run(manifest, temperature) if clusters > 1 else None


def load_ensemble(manifest: Manifest, temperature: float) -> tuple[Ensemble, list[dict]]:
    experts, metas = load_experts(manifest)
    return Ensemble(experts, load_centroid_router(manifest, len(experts), temperature),
                    mix_log_probs), metas
