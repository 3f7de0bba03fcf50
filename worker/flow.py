"""Flow matching (rectified flow): x_t = (1 - t) x0 + t e, target v = e - x0, Euler sampling."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def noisy(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t) * x0 + t * noise


def draw_noise(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(x0.shape[0], generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return t, noise


def flow_loss(model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error between predicted and target velocity."""
    prediction = model(noisy(x0, t, noise), t)
    return ((prediction - (noise - x0)) ** 2).flatten(1).mean(1)


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def euler_sample(velocity: Velocity, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data) in `steps` Euler steps."""
    x = noise
    times = torch.linspace(1.0, 0.0, steps + 1)
    for current, following in itertools.pairwise(times):
        t = torch.full((x.shape[0],), float(current))
        x = x + (following - current) * velocity(x, t)
    return x


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
