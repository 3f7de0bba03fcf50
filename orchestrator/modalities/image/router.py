"""DDM router: a small classifier predicting the cluster of x0 from (x_t, t), trained with
cross-entropy under the experts' noise schedule; accuracy recorded per noise level."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from orchestrator.modalities.image.data import LabelledImages, load_split, read_split
from orchestrator.state.config import RunConfig
from orchestrator.state.manifest import Manifest
from runstore import storage
from runstore.layout import RunLayout
from runstore.split_sample import EVAL_ROWS, ROUTER_ROWS
from worker.flow import draw_noise, noisy
from worker.models.unet import ResBlock, TimeMLP
from worker.objectives import count_flops


class RouterNet(nn.Module):
    def __init__(self, image_channels: int, clusters: int, channels: int = 32,
                 patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.time = TimeMLP(channels)
        self.stem = nn.Conv2d(image_channels * patch * patch, channels, 3, padding=1)
        self.block1 = ResBlock(channels, channels, channels * 4)
        self.down = nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1)
        self.block2 = ResBlock(channels * 2, channels * 2, channels * 4)
        self.head = nn.Linear(channels * 2, clusters)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.patch > 1:
            pad_h, pad_w = (-x.shape[-2]) % self.patch, (-x.shape[-1]) % self.patch
            if pad_h or pad_w:  # F.pad copies even when there is nothing to pad
                x = F.pad(x, (0, pad_w, 0, pad_h))
            x = F.pixel_unshuffle(x, self.patch)
        time = self.time(t)
        h = self.block1(self.stem(x), time)
        h = self.block2(self.down(h), time)
        return self.head(F.silu(h).mean(dim=(2, 3)))


ACCURACY_BATCH = 4_096  # rows through the router at a time when measuring its accuracy


@torch.no_grad()
def accuracy_by_noise(router: nn.Module, data: LabelledImages, bins: int,
                      seed: int) -> list[dict[str, float]]:
    """Router accuracy on `data` at the centre of each of `bins` equal noise-level bins."""
    router.eval()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(bins):
        level = (index + 0.5) / bins
        t = torch.full((len(data.x0),), level)
        noise = torch.randn(data.x0.shape, generator=generator)
        predicted = torch.cat([router(noisy(data.x0[part], t[part], noise[part]),
                                      t[part]).argmax(1)
                               for part in torch.arange(len(data.x0)).split(ACCURACY_BATCH)])
        rows.append({"t": level, "accuracy": (predicted == data.cluster).float().mean().item()})
    return rows


def train_router(layout: RunLayout, clusters: int, channels: int, steps: int, batch_size: int,
                 lr: float, threads: int, seed: int, bins: int, patch: int = 2,
                 check_cancel: Callable[[], None] = lambda: None) -> tuple[dict[str, str], dict]:
    """`check_cancel` is called every step: it raises to stop when the run is cancelled."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    # A seeded sample of at most ROUTER_ROWS, uint8 until a batch is drawn.
    train = read_split(layout, clusters, "train", ROUTER_ROWS, seed)
    router = RouterNet(train.channels, clusters, channels, patch)
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    started = time.perf_counter()
    router.train()
    for step in range(steps):
        check_cancel()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (1 - step / steps)
        index = torch.randint(0, len(train), (batch_size,), generator=generator)
        x0 = train.x0(index)
        t, noise = draw_noise(x0, generator)
        loss = F.cross_entropy(router(noisy(x0, t, noise), t), train.cluster[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    heldout = load_split(layout, clusters, "heldout", EVAL_ROWS, seed)
    accuracy = accuracy_by_noise(router, heldout, bins, seed)
    meta = {
        "clusters": clusters, "channels": channels, "patch": patch,
        "image_channels": train.channels,
        "steps": steps, "batch_size": batch_size, "final_loss": loss.item(),
        "train_seconds": seconds,
        "train_flops": 3.0 * count_flops(router, train.x0(slice(0, 1)), torch.zeros(1)) * steps
        * batch_size,
        "accuracy_by_noise": accuracy,
        "heldout_accuracy": sum(row["accuracy"] for row in accuracy) / len(accuracy),
    }
    weights = storage.join(layout.router, "model.safetensors")
    meta_url = storage.join(layout.router, "meta.json")
    artifacts = {
        weights: storage.write_bytes(weights, save_tensors(router.state_dict())),
        meta_url: storage.write_json(meta_url, meta),
    }
    return {u.removeprefix(layout.root).lstrip("/"): s for u, s in artifacts.items()}, meta


def load_router(weights: bytes, meta: dict) -> RouterNet:
    router = RouterNet(meta["image_channels"], meta["clusters"], meta["channels"],
                       meta.get("patch", 2))  # routers saved before `patch` existed used 2
    router.load_state_dict(load_tensors(weights))
    return router.eval()


def build_router(config: RunConfig, manifest: Manifest,
                 console: Console) -> tuple[dict[str, str], dict[str, Any]]:
    """The router stage for images: train the classifier on noisy inputs."""
    cfg = config.router
    with console.status("training router"):
        artifacts, meta = train_router(manifest.layout, config.clusters, cfg.channels, cfg.steps,
                                       cfg.batch_size, cfg.lr, cfg.threads, config.seed,
                                       config.eval.noise_bins, cfg.patch,
                                       manifest.check_cancel)
    console.print(f"router: held-out accuracy {meta['heldout_accuracy']:.3f} (mean over noise)")
    return artifacts, {"heldout_accuracy": meta["heldout_accuracy"],
                       "train_flops": meta["train_flops"]}
