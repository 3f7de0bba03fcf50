"""DDM on the ensemble engine: v(x_t, t) = sum_k p(k | x_t, t) v_k(x_t, t), the router a
classifier on noisy images, and Euler sampling of a batch of independent requests (each with
its own routing, seed and number of steps) one engine call per denoising step."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from orchestrator.ensemble import Ensemble, ExpertPart, Routing
from orchestrator.ensemble.experts import load_experts
from orchestrator.modalities.image.router import load_router
from orchestrator.state.manifest import Manifest


class ClassifierRouter:
    """p(k | x_t, t): the router network's softmax."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).softmax(1)


def add_velocities(batch: int, parts: list[ExpertPart],
                   inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The router-weighted sum of the experts' velocities."""
    x = inputs[0]
    shape = (-1, *([1] * (x.dim() - 1)))
    if not parts:  # an empty batch
        return torch.zeros_like(x)
    if parts[0].dense:
        out = torch.zeros_like(x)
        for part in parts:
            out.add_(part.output * part.weight.view(shape))
        return out
    # One scatter-add back: a handful of ops per step whatever the routing (top1's groups
    # are small, so per-op costs would otherwise show).
    velocity = torch.cat([part.output for part in parts])
    rows = torch.cat([part.rows for part in parts])
    weight = torch.cat([part.weight for part in parts])
    return torch.zeros_like(x).index_add_(0, rows, velocity.mul_(weight.view(shape)))


def velocity(ensemble: Ensemble, x: torch.Tensor, t: torch.Tensor,
             routing: Routing | Sequence[Routing]) -> torch.Tensor:
    return ensemble.mix(ensemble.route((x, t), routing), (x, t))


@dataclass(frozen=True)
class SampleRequest:
    count: int = 1
    steps: int = 40
    routing: Routing = field(default_factory=Routing)
    seed: int = 0


@dataclass
class Walk:
    """One request in flight: its images at the current time, its Euler schedule from t = 1
    to 0, the steps taken, and (when traced) each step's mixture weights [count, K]."""

    request: SampleRequest
    x: torch.Tensor
    times: torch.Tensor
    done: int = 0
    trace: list[torch.Tensor] | None = None

    @property
    def finished(self) -> bool:
        return self.done == self.request.steps


class Denoising:
    """Requests in flight: each starts from its own seeded noise and walks its own Euler
    schedule; `step()` advances unfinished ones in one engine call (the router once on the
    whole batch, each expert once on its rows), so requests at different times share it.
    Requests join between steps (`add`) and leave once finished (`retire`)."""

    def __init__(self, ensemble: Ensemble, image_shape: Sequence[int],
                 requests: Sequence[SampleRequest] = (),
                 noise: Sequence[torch.Tensor] | None = None, trace: bool = False) -> None:
        self.ensemble = ensemble
        self.image_shape = tuple(image_shape)
        self.trace = trace
        self.walks: list[Walk] = []
        for index, request in enumerate(requests):
            self.add(request, None if noise is None else noise[index])

    def add(self, request: SampleRequest, noise: torch.Tensor | None = None) -> Walk:
        """Join a request, also between two steps of the others."""
        if noise is None:
            noise = torch.randn((request.count, *self.image_shape),
                                generator=torch.Generator().manual_seed(request.seed))
        walk = Walk(request, noise, torch.linspace(1.0, 0.0, request.steps + 1),
                    trace=[] if self.trace else None)
        self.walks.append(walk)
        return walk

    def retire(self, walks: Sequence[Walk]) -> None:
        """Forget walks (finished, or whose client left)."""
        gone = {id(walk) for walk in walks}
        self.walks = [walk for walk in self.walks if id(walk) not in gone]

    @property
    def finished(self) -> bool:
        return all(walk.finished for walk in self.walks)

    def step(self, walks: Sequence[Walk] | None = None) -> None:
        """One Euler step of `walks` (default: every unfinished one) in one engine call. A
        failed expert call raises before any walk moves, so the step can be taken again."""
        active = [walk for walk in (self.walks if walks is None else walks)
                  if not walk.finished]
        if not active:
            return
        counts = [walk.request.count for walk in active]
        x = torch.cat([walk.x for walk in active])
        now = [walk.times[walk.done] for walk in active]
        following = [walk.times[walk.done + 1] for walk in active]
        t = torch.cat([torch.full((n,), float(c)) for n, c in zip(counts, now, strict=True)])
        dt = torch.cat([(f - c).expand(n)
                        for n, c, f in zip(counts, now, following, strict=True)])
        routing = [walk.request.routing for walk in active for _ in range(walk.request.count)]
        weights = self.ensemble.route((x, t), routing)
        v = self.ensemble.mix(weights, (x, t))
        moved = x + dt.view(-1, *([1] * (x.dim() - 1))) * v
        for walk, part, used in zip(active, moved.split(counts), weights.split(counts),
                                    strict=True):
            walk.x = part
            walk.done += 1
            if walk.trace is not None:
                walk.trace.append(used)

    def run(self) -> list[torch.Tensor]:
        # Inference mode drops autograd's per-op bookkeeping, which no_grad keeps; clone so
        # callers get ordinary tensors they may modify in place.
        with torch.inference_mode():
            while not self.finished:
                self.step()
        return [walk.x.clone() for walk in self.walks]


def sample(ensemble: Ensemble, noise: torch.Tensor, steps: int,
           routing: Routing) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data) in `steps` Euler steps."""
    request = SampleRequest(len(noise), steps, routing)
    return Denoising(ensemble, noise.shape[1:], [request], [noise]).run()[0]


def sample_requests(ensemble: Ensemble, image_shape: Sequence[int],
                    requests: Sequence[SampleRequest]) -> list[torch.Tensor]:
    return Denoising(ensemble, image_shape, requests).run()


def load_classifier_router(manifest: Manifest, clusters: int) -> ClassifierRouter | None:
    if clusters < 2:
        return None
    meta = json.loads(manifest.read_verified("router/meta.json"))
    return ClassifierRouter(load_router(manifest.read_verified("router/model.safetensors"), meta))


def load_ensemble(manifest: Manifest) -> tuple[Ensemble, list[dict]]:
    experts, metas = load_experts(manifest)
    return Ensemble(experts, load_classifier_router(manifest, len(experts)),
                    add_velocities), metas
