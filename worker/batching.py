"""Micro-batches fitted to a worker's memory; gradient accumulation keeps the effective batch.

Every expert trains with the same effective batch whatever island it lands on:
batch = data-parallel workers x micro-batch x accumulation steps. The micro-batch is the
largest divisor of a worker's share that fits its memory, from an estimate of what training
holds: weights, gradients, two Adam moments and the EMA copy (5 x parameter bytes), plus the
activations autograd saves for backward, counted per sample on a real forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runstore.errors import InputError
from worker.objectives import Objective

HEADROOM = 0.8  # leave a fifth of the memory to the allocator, workspaces and fragmentation


@dataclass(frozen=True)
class BatchPlan:
    batch: int  # the effective batch of one optimizer step, over all workers
    world: int  # data-parallel workers
    micro: int  # samples in one forward/backward on one worker
    accumulation: int  # micro-batches per worker per optimizer step

    @property
    def share(self) -> int:
        return self.batch // self.world


@dataclass(frozen=True)
class MemoryModel:
    fixed_bytes: int  # independent of the batch
    bytes_per_sample: int  # activations saved for backward, per sample


def estimate_memory(model: torch.nn.Module, objective: Objective,
                    probe_rows: int = 2) -> MemoryModel:
    """Count what training holds, by running one forward pass with autograd's saved-tensor
    hooks on `probe_rows` real rows."""
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Autograd saves some tensors several times (and parameters too): count storage once.
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        seen[key] = key[1]
        return tensor

    rows = min(probe_rows, objective.rows)
    batch = objective.batch(torch.arange(rows), torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        objective.loss_sum(model, batch)
    parameter_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(size for (pointer, _), size in seen.items() if pointer not in parameter_storage)
    return MemoryModel(fixed_bytes=5 * parameters, bytes_per_sample=max(1, saved // rows))


def plan_batch(batch: int, world: int, memory_gb: float | None,
               memory: MemoryModel | None, island: str = "") -> BatchPlan:
    """The largest micro-batch dividing a worker's share that fits `memory_gb`."""
    if batch % world:
        raise InputError("experts.batch_size", f"{batch} does not split evenly over the "
                         f"{world} data-parallel workers of island {island!r}")
    share = batch // world
    if memory_gb is None or memory is None:
        return BatchPlan(batch, world, share, 1)
    budget = memory_gb * 2**30 * HEADROOM - memory.fixed_bytes
    fits = int(budget // memory.bytes_per_sample)
    if fits < 1:
        needed = (memory.fixed_bytes + memory.bytes_per_sample) / HEADROOM / 2**30
        raise InputError(f"islands.pool[{island}].memory_gb", f"{memory_gb} GB cannot hold the "
                         f"model and one sample (needs about {needed:.2f} GB)")
    micro = max(d for d in range(1, share + 1) if share % d == 0 and d <= fits)
    return BatchPlan(batch, world, micro, share // micro)
