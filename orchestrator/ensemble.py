"""DDM ensemble: v(x_t, t) = sum_k p(k | x_t, t) v_k(x_t, t), with sparse strategies.

Each strategy turns router probabilities into mixture weights. Experts run grouped: once
per step, on exactly the rows that give them non-zero weight.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from safetensors.torch import load as load_tensors
from torch import nn

from orchestrator.manifest import Manifest
from orchestrator.router import load_router
from runstore.errors import InputError
from worker.flow import euler_sample
from worker.models import build_model


def top1_weights(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    return torch.zeros_like(probs).scatter_(1, probs.argmax(1, keepdim=True), 1.0)


def topk_weights(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    values, index = probs.topk(min(top_k, probs.shape[1]), dim=1)
    weights = torch.zeros_like(probs).scatter_(1, index, values)
    return weights / weights.sum(1, keepdim=True)


def full_weights(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    return probs / probs.sum(1, keepdim=True)


STRATEGIES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "top1": top1_weights,
    "topk": topk_weights,
    "full": full_weights,
}


class Ensemble(nn.Module):
    def __init__(self, experts: list[nn.Module], router: nn.Module | None) -> None:
        super().__init__()
        if len(experts) > 1 and router is None:
            raise ValueError("an ensemble of several experts needs a router")
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.expert_rows = 0  # expert forward passes, counted per row: the cost of sampling

    @property
    def clusters(self) -> int:
        return len(self.experts)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return torch.ones(x.shape[0], 1)
        return self.router(x, t).softmax(1)

    def weights(self, x: torch.Tensor, t: torch.Tensor, strategy: str,
                top_k: int = 2) -> torch.Tensor:
        if strategy not in STRATEGIES:
            raise InputError("strategy", f"unknown {strategy!r}; expected one of "
                             f"{', '.join(STRATEGIES)}")
        return STRATEGIES[strategy](self.probabilities(x, t), top_k)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, strategy: str,
                 top_k: int = 2) -> torch.Tensor:
        weights = self.weights(x, t, strategy, top_k)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows = weights[:, index].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            scale = weights[rows, index].view(-1, *([1] * (x.dim() - 1)))
            if rows.numel() == x.shape[0]:  # every row: skip the gather
                out.add_(expert(x, t) * scale)
            else:
                out.index_add_(0, rows, expert(x[rows], t[rows]) * scale)
            self.expert_rows += rows.numel()
        return out

    def sample(self, noise: torch.Tensor, steps: int, strategy: str,
               top_k: int = 2) -> torch.Tensor:
        return euler_sample(lambda x, t: self.velocity(x, t, strategy, top_k), noise, steps)


def load_expert(manifest: Manifest, expert: int) -> tuple[nn.Module, dict]:
    base = f"experts/expert-{expert}/final"
    meta = json.loads(manifest.read_verified(f"{base}/meta.json"))
    model = build_model(meta["model"], **meta["model_kwargs"])
    model.load_state_dict(load_tensors(manifest.read_verified(f"{base}/model.safetensors")))
    return model.eval(), meta


def load_ensemble(manifest: Manifest) -> tuple[Ensemble, list[dict]]:
    loaded = [load_expert(manifest, k) for k in manifest.experts]
    router = None
    if len(loaded) > 1:
        meta = json.loads(manifest.read_verified("router/meta.json"))
        router = load_router(manifest.read_verified("router/model.safetensors"), meta)
    return Ensemble([model for model, _ in loaded], router), [meta for _, meta in loaded]
