"""What an expert learns from its shard, addressed by name: flow matching on images
(`flow`), next-byte prediction on text (`lm`). The training loop asks an objective for a
global batch of row indices (its inputs and all its randomness, drawn once) and for the
summed loss of any slice of it, so a batch split into micro-batches or across data-parallel
workers gives the same gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from runstore.shards import iter_shard_texts, read_shard_pixels
from worker.flow import draw_noise, flow_loss, to_model_space
from worker.models.byte_lm import BOS, EOS, PAD

Batch = dict[str, torch.Tensor]  # every tensor's first dimension is the sample


class Objective(Protocol):
    rows: int

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch: ...
    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor: ...
    def units(self, batch: Batch) -> float:
        """What the loss averages over: samples, or target tokens."""
        ...
    def forward_flops(self, model: torch.nn.Module) -> float: ...
    def meta(self) -> dict[str, Any]: ...


def count_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return float(counter.get_total_flops())


class FlowObjective:
    """Rectified-flow matching on the shard's images; a row is one image. The pixels stay
    uint8 (a quarter of float32) and a batch is moved to model space when drawn."""

    def __init__(self, shard_urls: list[str]) -> None:
        self.pixels = torch.from_numpy(read_shard_pixels(shard_urls))
        self.rows = len(self.pixels)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        x0 = to_model_space(self.pixels[index])
        t, noise = draw_noise(x0, generator)
        return {"x0": x0, "t": t, "noise": noise}

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return flow_loss(model, batch["x0"], batch["t"], batch["noise"]).sum()

    def units(self, batch: Batch) -> float:
        return float(len(batch["x0"]))

    def forward_flops(self, model: torch.nn.Module) -> float:
        return count_flops(model, to_model_space(self.pixels[:1]), torch.zeros(1))

    def meta(self) -> dict[str, Any]:
        return {"image_shape": list(to_model_space(self.pixels[:1]).shape[1:])}


def _text_tokens(texts: list[str]) -> np.ndarray:
    """int16 [BOS] text [EOS] ... of these texts (byte_lm.encode, then EOS, per text)."""
    data = [text.encode("utf-8") for text in texts]
    out = np.empty(sum(len(part) + 2 for part in data), np.int16)
    at = 0
    for part in data:
        out[at] = BOS
        out[at + 1:at + 1 + len(part)] = np.frombuffer(part, np.uint8)
        out[at + 1 + len(part)] = EOS
        at += len(part) + 2
    return out


class LanguageObjective:
    """Next-byte prediction; the shard's texts are packed into one stream ([BOS] text [EOS]
    ...) and cut into windows of context + 1 tokens; a row is one window. Tokens are kept
    as int16 (the vocabulary is 259) and widened per batch."""

    def __init__(self, shard_urls: list[str], context: int) -> None:
        stream = np.concatenate([np.zeros(0, np.int16),
                                 *(_text_tokens(texts) for texts in iter_shard_texts(shard_urls))])
        length = context + 1
        padding = (-len(stream)) % length
        stream = np.concatenate([stream, np.full(padding, PAD, np.int16)])
        self.windows = torch.from_numpy(stream).view(-1, length)
        self.context = context
        self.rows = len(self.windows)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        return {"window": self.windows[index].long()}

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        window = batch["window"]
        logits = model(window[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1),
                               ignore_index=PAD, reduction="sum")

    def units(self, batch: Batch) -> float:
        return float((batch["window"][:, 1:] != PAD).sum())

    def forward_flops(self, model: torch.nn.Module) -> float:
        return count_flops(model, self.windows[:1, :-1].long())

    def meta(self) -> dict[str, Any]:
        return {"context": self.context, "tokens": int((self.windows != PAD).sum())}


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "flow": FlowObjective,
    "lm": LanguageObjective,
}


def register_objective(name: str, builder: Callable[..., Objective]) -> None:
    """Add an objective; a modality outside this package registers its own here."""
    OBJECTIVES[name] = builder


def make_objective(name: str, shard_urls: list[str], **kwargs: Any) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](shard_urls, **kwargs)
