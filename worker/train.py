"""One expert's training loop: flow matching on its own shard only, checkpointed, resumable."""

from __future__ import annotations

import contextlib
import copy
import math
import random
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.nn.parallel import DistributedDataParallel

from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from worker.batching import estimate_memory, plan_batch
from worker.checkpoint import TrainState, checkpoint_steps, load_checkpoint, save_checkpoint
from worker.models import build_model
from worker.objectives import make_objective
from worker.tracking import ExpertLog, MetricsLog, WandbRun

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ExpertSpec:
    expert: int
    model: str
    model_kwargs: dict[str, Any]
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    ema_decay: float
    checkpoint_every: int
    keep_checkpoints: int
    threads: int
    log_every: int
    seed: int
    island: str = "local"
    tracking: dict[str, str] = field(default_factory=lambda: {"mode": "disabled"})
    objective: str = "flow"
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a safetensors URL to branch from (c-BTM seed model)
    shard_clusters: tuple[int, ...] = ()  # clusters whose shards it trains on; () = its own
    attempt: int = 1  # which launch this is, so progress reports of a dead one are told apart
    memory_gb: float | None = None  # one worker's memory; None: the whole share at once
    device: str = "cpu"
    hardware: dict[str, Any] = field(default_factory=dict)  # the island's spec, for tracking


@dataclass
class ExpertResult:
    expert: int
    steps: int
    samples_seen: int
    train_flops: float
    final_loss: float
    resumed_from: int
    artifacts: dict[str, str]  # relative path -> sha256


def learning_rate(spec: ExpertSpec, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth: a pure function of the step."""
    warm = min(1.0, (step + 1) / max(1, spec.warmup_steps))
    progress = min(1.0, step / max(1, spec.steps))
    return spec.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def epoch_order(seed: int, expert: int, epoch: int, rows: int) -> torch.Tensor:
    # expert + 1: the Branch-Train-Merge seed model is expert -1.
    seed_words = np.random.SeedSequence([seed, expert + 1, epoch]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(seed_words[0]) << 32 | int(seed_words[1]))
    return torch.randperm(rows, generator=generator)


def next_batch(spec: ExpertSpec, state: TrainState, rows: int) -> torch.Tensor:
    """Indices of the next batch, walking the epoch permutation and wrapping into the next."""
    picked = []
    needed = spec.batch_size
    while needed:
        order = epoch_order(spec.seed, spec.expert, state.epoch, rows)
        take = order[state.cursor : state.cursor + needed]
        picked.append(take)
        needed -= len(take)
        state.cursor += len(take)
        if state.cursor >= rows:
            state.epoch, state.cursor = state.epoch + 1, 0
    return torch.cat(picked)


def _resume(spec: ExpertSpec, layout: RunLayout, model: torch.nn.Module, ema: torch.nn.Module,
            optimizer: torch.optim.Optimizer, generator: torch.Generator,
            log: Callable[[str], None]) -> TrainState:
    for step in reversed(checkpoint_steps(layout.checkpoints(spec.expert))):
        folder = layout.checkpoint(spec.expert, step)
        try:
            state = load_checkpoint(folder, model, ema, optimizer, generator)
        except InputError as err:
            log(f"expert {spec.expert}: skipping checkpoint step {step}: {err}")
            continue
        log(f"expert {spec.expert}: resuming from step {state.step}")
        return state
    return TrainState()


def _prune(layout: RunLayout, expert: int, keep: int) -> None:
    for step in checkpoint_steps(layout.checkpoints(expert))[:-keep]:
        storage.remove(layout.checkpoint(expert, step))


def data_parallel() -> tuple[int, int]:
    """(rank, world) of this worker inside its island's process group; (0, 1) alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_expert(spec: ExpertSpec, layout: RunLayout, progress: Progress | None = None,
                 log: Callable[[str], None] = print) -> ExpertResult:
    """Train expert `spec.expert` to `spec.steps`, resuming from its last good checkpoint.

    With a process group (several workers on one island), every worker walks the same global
    batch and takes its slice; DDP sums gradients inside the island. Worker 0 alone writes
    checkpoints, metrics, logs and the final weights.
    """
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed % 2**32)
    random.seed(spec.seed)
    rank, world = data_parallel()
    lead = rank == 0
    device = torch.device(spec.device)

    objective = make_objective(spec.objective, shard_urls(spec, layout), **spec.objective_kwargs)
    rows = objective.rows
    model = build_model(spec.model, **spec.model_kwargs)
    if spec.init_from:
        model.load_state_dict(load_tensors(storage.read_bytes(spec.init_from)))
    flops_per_sample = 3.0 * objective.forward_flops(model)  # forward + backward
    memory = estimate_memory(model, objective) if spec.memory_gb else None
    plan = plan_batch(spec.batch_size, world, spec.memory_gb, memory, spec.island)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    generator = torch.Generator().manual_seed(spec.seed)  # on the CPU: same draws anywhere
    expert_log = ExpertLog(layout.expert_log(spec.expert), f"attempt {spec.attempt} on island "
                           f"{spec.island} ({socket.gethostname()}, {device.type}): micro-batch "
                           f"{plan.micro} x accumulation {plan.accumulation} x {world} "
                           f"worker(s) = batch {plan.batch}", enabled=lead)

    def note(line: str) -> None:  # to the caller's log and the expert's log in the run
        if lead:
            log(line)
        expert_log.write(line)

    state = _resume(spec, layout, model, ema, optimizer, generator, note)
    resumed_from = state.step
    # Broadcasts worker 0's weights; resumed workers already agree, so this only checks.
    trained = DistributedDataParallel(model) if world > 1 else model

    metrics = MetricsLog(layout.metrics(spec.expert), resumed_from) if lead else None
    hardware = {"host": socket.gethostname(), "device": device.type, "world": world,
                "micro_batch": plan.micro, "accumulation": plan.accumulation}
    tracker = WandbRun(spec.tracking if lead else {"mode": "disabled"},
                       config={**asdict(spec), "rows": rows, **hardware})
    window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
    loss_value = float("nan")
    report = progress if lead else None
    if report:  # where this attempt starts: what a crash before it would have lost
        report({"expert": spec.expert, "step": state.step, "loss": loss_value,
                "samples_per_s": 0.0, "total": spec.steps, "attempt": spec.attempt,
                "resumed_from": resumed_from, **hardware})
    expert_log.flush()
    mine = slice(rank * plan.share, (rank + 1) * plan.share)
    model.train()
    while state.step < spec.steps:
        lr = learning_rate(spec, state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = objective.batch(next_batch(spec, state, rows), generator)
        # Each micro-batch's summed loss over the global batch's units: the accumulated
        # gradient is the full batch's mean, whatever the split. DDP averages over workers,
        # hence the factor `world`.
        scale = world / objective.units(batch)
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for part in range(plan.accumulation):
            chunk = slice(mine.start + part * plan.micro, mine.start + (part + 1) * plan.micro)
            inputs = {key: value[chunk].to(device) for key, value in batch.items()}
            last = part == plan.accumulation - 1
            with contextlib.nullcontext() if last or world == 1 else trained.no_sync():
                loss_sum = objective.loss_sum(trained, inputs)
                (loss_sum * scale).backward()
            step_loss += loss_sum.detach() * (scale / world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        decay = min(spec.ema_decay, (1 + state.step) / (10 + state.step))
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), model.parameters(), strict=True):
                averaged.lerp_(live, 1.0 - decay)
        state.step += 1
        state.samples_seen += spec.batch_size
        window_loss += float(step_loss)
        window_steps += 1

        if state.step % spec.log_every == 0 or state.step == spec.steps:
            if world > 1:  # every worker saw a slice: the batch loss is their sum
                total = torch.tensor([window_loss], dtype=torch.float64)
                dist.all_reduce(total)
                window_loss = float(total)
            elapsed = time.perf_counter() - window_start
            loss_value = window_loss / window_steps
            row = {"step": state.step, "loss": loss_value, "lr": lr,
                   "step_time": elapsed / window_steps,
                   "samples_per_s": window_steps * spec.batch_size / max(elapsed, 1e-9)}
            if metrics is not None:
                metrics.append(row)
            tracker.log(row, state.step)
            if report:
                report({"expert": spec.expert, **row, "total": spec.steps,
                        "attempt": spec.attempt, "resumed_from": resumed_from, **hardware})
            expert_log.write(f"step {state.step}/{spec.steps} loss {loss_value:.4f} "
                             f"lr {lr:.2e} {row['samples_per_s']:.1f} samples/s")
            expert_log.flush(every=10.0)
            window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
        if lead and (state.step % spec.checkpoint_every == 0 or state.step == spec.steps):
            save_checkpoint(layout.checkpoint(spec.expert, state.step), model, ema, optimizer,
                            generator, state)
            _prune(layout, spec.expert, spec.keep_checkpoints)
            if metrics is not None:
                metrics.flush()
            expert_log.write(f"checkpoint at step {state.step}")
            expert_log.flush()

    tracker.finish()
    artifacts = (write_final(spec, layout, ema, {**objective.meta(), **hardware}, state,
                             flops_per_sample, loss_value, rows) if lead else {})
    expert_log.write(f"finished at step {state.step}, loss {loss_value:.4f}")
    expert_log.flush()
    return ExpertResult(expert=spec.expert, steps=state.step, samples_seen=state.samples_seen,
                        train_flops=flops_per_sample * state.samples_seen, final_loss=loss_value,
                        resumed_from=resumed_from, artifacts=artifacts)


def shard_urls(spec: ExpertSpec, layout: RunLayout) -> list[str]:
    """An expert trains on its own shard; a seed model names every cluster's."""
    return [layout.shard(cluster) for cluster in (spec.shard_clusters or (spec.expert,))]


def write_final(spec: ExpertSpec, layout: RunLayout, ema: torch.nn.Module,
                objective_meta: dict[str, Any], state: TrainState, flops_per_sample: float,
                loss: float, rows: int) -> dict[str, str]:
    folder = layout.final(spec.expert)
    weights = storage.join(folder, "model.safetensors")
    meta = storage.join(folder, "meta.json")
    artifacts = {weights: storage.write_bytes(weights, save_tensors(
        {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}))}
    artifacts[meta] = storage.write_json(meta, {
        "expert": spec.expert, "model": spec.model, "model_kwargs": spec.model_kwargs,
        **objective_meta, "steps": state.step, "rows": rows,
        "samples_seen": state.samples_seen, "train_flops": flops_per_sample * state.samples_seen,
        "final_loss": loss, "island": spec.island, "weights_sha256": artifacts[weights]})
    return {url.removeprefix(layout.root).lstrip("/"): sha for url, sha in artifacts.items()}
