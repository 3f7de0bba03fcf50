"""One expert's training loop: flow matching on its own shard only, checkpointed, resumable."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import importlib
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
from runstore.fence import check_driver, check_epoch
from runstore.layout import RunLayout
from worker.batching import estimate_memory, plan_batch
from worker.checkpoint import (
    CheckpointWriter,
    Snapshot,
    TrainState,
    checkpoint_steps,
    cpu_copy,
    load_checkpoint,
    snapshot,
    verified_files,
    write_checkpoint,
)
from worker.models import build_model
from worker.objectives import Objective, make_objective
from worker.tracking import ExpertLog, MetricsLog, WandbRun

Progress = Callable[[dict[str, Any]], None]
# How often a worker reads the run's lease to learn whether its driver is still there (and
# at every checkpoint): a driver that died leaves no one to cancel its workers.
DRIVER_CHECK_SECONDS = 10.0


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
    # Modules to import before building: a modality registered outside this package adds
    # its models and objectives to the registries there, and the worker needs them too.
    imports: tuple[str, ...] = ()
    # Store checkpoints in the background while training goes on. A crash then loses at most
    # one interval plus the steps trained while the newest checkpoint was being stored, the
    # time a synchronous write (False) would have stalled training for.
    async_checkpoints: bool = True
    # The run lease's epoch of the driver that started this attempt (runstore/fence.py): a
    # newer one on storage means that driver lost the run, and nothing more is published.
    # None outside a leased run (benchmarks).
    epoch: int | None = None
    lr_schedule: str = "cosine"  # after the warm-up: "cosine" decay to a tenth, or "constant"
    # Fractions of `steps` at which a permanent snapshot (EMA and raw weights) is kept.
    snapshot_at: tuple[float, ...] = ()


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
    """Linear warm-up, then cosine decay to a tenth (or constant): a pure function of the
    step."""
    warm = min(1.0, (step + 1) / max(1, spec.warmup_steps))
    if spec.lr_schedule == "constant":
        return spec.lr * warm
    progress = min(1.0, step / max(1, spec.steps))
    return spec.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@functools.lru_cache(maxsize=2)  # every batch reads it: drawn once per epoch, not per step
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


def snapshot_steps(spec: ExpertSpec) -> list[int]:
    """The steps `spec.snapshot_at` names: round(f x steps), at least step 1."""
    return sorted({min(spec.steps, max(1, round(f * spec.steps))) for f in spec.snapshot_at})


def _complete_snapshot(folder: str) -> dict[str, str] | None:
    """A snapshot folder's files with their sha256 (meta.json included), or None when it is
    missing, incomplete or damaged."""
    try:
        files = verified_files(folder)
        meta = storage.read_bytes(storage.join(folder, "meta.json"))
    except (InputError, FileNotFoundError):
        return None
    return {**{name: storage.sha256_bytes(data) for name, data in files.items()},
            "meta.json": storage.sha256_bytes(meta)}


def _write_snapshot(spec: ExpertSpec, layout: RunLayout, model: torch.nn.Module,
                    ema: torch.nn.Module, state: TrainState, flops_per_sample: float) -> None:
    """Keep this step's weights for good. A complete snapshot already there (written by an
    attempt that got this far before it died) is left as it is: training is deterministic,
    so it holds the same weights."""
    folder = layout.snapshot(spec.expert, state.step)
    if _complete_snapshot(folder) is not None:
        return
    files: Snapshot = {"ema.safetensors": {k: cpu_copy(v) for k, v in ema.state_dict().items()},
                       "model.safetensors": {k: cpu_copy(v)
                                             for k, v in model.state_dict().items()}}
    write_checkpoint(folder, files, state.step, before_commit=functools.partial(
        check_epoch, layout, spec.epoch, folder), meta={
        "expert": spec.expert, "model": spec.model, "model_kwargs": spec.model_kwargs,
        "samples_seen": state.samples_seen,
        "train_flops": flops_per_sample * state.samples_seen})


def snapshot_artifacts(spec: ExpertSpec, layout: RunLayout,
                       log: Callable[[str], None]) -> dict[str, str]:
    """Every complete snapshot of the expert's steps, as {url: sha256}, for the manifest:
    those of earlier attempts too, so a resumed run keeps them."""
    artifacts = {}
    for step in snapshot_steps(spec):
        folder = layout.snapshot(spec.expert, step)
        if (files := _complete_snapshot(folder)) is None:
            log(f"expert {spec.expert}: snapshot at step {step} is missing or damaged")
            continue
        artifacts.update({storage.join(folder, name): sha for name, sha in files.items()})
    return artifacts


def _prune(layout: RunLayout, expert: int, keep: int) -> None:
    for step in checkpoint_steps(layout.checkpoints(expert))[:-keep]:
        storage.remove(layout.checkpoint(expert, step))


def _store_checkpoint(layout: RunLayout, spec: ExpertSpec, step: int, files: Snapshot,
                      metrics: MetricsLog | None, metric_rows: list[dict[str, Any]]) -> float:
    """The background writer's job: the checkpoint (meta.json last, once the lease's epoch
    is still this attempt's), then pruning the oldest ones, then the metrics up to its
    step. Returns the seconds it took."""
    started = time.perf_counter()
    folder = layout.checkpoint(spec.expert, step)
    write_checkpoint(folder, files, step, before_commit=functools.partial(
        check_epoch, layout, spec.epoch, folder))
    _prune(layout, spec.expert, spec.keep_checkpoints)
    if metrics is not None:
        metrics.flush(metric_rows)
    return time.perf_counter() - started


def diverged(what: str, step: int) -> FloatingPointError:
    """The error that ends an attempt whose loss or weights stopped being finite: a crash,
    retried from the last checkpoint, which was committed while they still were."""
    return FloatingPointError(f"non-finite {what} at step {step}")


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([tensor.isfinite().all() for tensor in tensors]).all())


def keep_freed_memory() -> None:
    """Keep freed blocks in the process heap (glibc only; elsewhere nothing changes).

    By default glibc maps blocks above 128 KB-32 MB fresh from the OS and gives freed heap
    top back, so on a CPU every step's activations are page-faulted and zeroed again:
    measured ~5-10% of a step (system time, and slower elementwise ops) on the quickstart
    U-Net. The cost: the process keeps its peak memory, which a training worker does anyway.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: heap, not mmap, below 1 GiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not give the heap top back


def data_parallel() -> tuple[int, int]:
    """(rank, world) of this worker inside its island's process group; (0, 1) alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_objective_and_model(spec: ExpertSpec,
                              layout: RunLayout) -> tuple[Objective, torch.nn.Module]:
    for module in spec.imports:
        importlib.import_module(module)
    objective = make_objective(spec.objective, shard_urls(spec, layout), **spec.objective_kwargs)
    return objective, build_model(spec.model, **spec.model_kwargs)


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
    if device.type == "cpu":
        keep_freed_memory()

    objective, model = build_objective_and_model(spec, layout)
    rows = objective.rows
    if spec.init_from:
        model.load_state_dict(load_tensors(storage.read_bytes(spec.init_from)))
    flops_per_sample = 3.0 * objective.forward_flops(model)  # forward + backward
    memory = estimate_memory(model, objective) if spec.memory_gb else None
    plan = plan_batch(spec.batch_size, world, spec.memory_gb, memory, spec.island)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    generator = torch.Generator().manual_seed(spec.seed)  # on the CPU: same draws anywhere
    expert_log = ExpertLog(layout.expert_log(spec.expert), spec.attempt,
                           f"attempt {spec.attempt} on island "
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
                       config={**asdict(spec), "rows": rows, **hardware},
                       warn=lambda line: note(f"expert {spec.expert}: {line}"))
    # The window's loss stays on the device: reading it every step would sync an accelerator.
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_start, window_steps = time.perf_counter(), 0
    loss_value = float("nan")
    report = progress if lead else None
    if report:  # where this attempt starts: what a crash before it would have lost
        report({"expert": spec.expert, "step": state.step, "loss": loss_value,
                "samples_per_s": 0.0, "total": spec.steps, "attempt": spec.attempt,
                "resumed_from": resumed_from, **hardware})
    expert_log.flush()
    mine = slice(rank * plan.share, (rank + 1) * plan.share)
    parameters, averages = list(model.parameters()), list(ema.parameters())
    writer = CheckpointWriter()
    snapshot_at = set(snapshot_steps(spec))

    def fail(error: Exception) -> Exception:  # said in the expert's log before it ends
        note(f"expert {spec.expert}: {error}")
        expert_log.flush()
        return error

    def stored(block: bool) -> None:  # note a checkpoint once it is complete on storage
        if (done := writer.collect(block)) is not None:
            expert_log.write(f"checkpoint at step {done[0]} stored in {done[1]:.3f} s")

    model.train()
    driver_checked = time.monotonic()
    try:
        while state.step < spec.steps:
            lr = learning_rate(spec, state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = objective.batch(next_batch(spec, state, rows), generator)
            # Each micro-batch's summed loss over the global batch's units: the accumulated
            # gradient is the full batch's mean, whatever the split. DDP averages over
            # workers, hence the factor `world`.
            scale = world / objective.units(batch)
            optimizer.zero_grad(set_to_none=True)
            for part in range(plan.accumulation):
                chunk = slice(mine.start + part * plan.micro,
                              mine.start + (part + 1) * plan.micro)
                inputs = {key: value[chunk].to(device) for key, value in batch.items()}
                last = part == plan.accumulation - 1
                with contextlib.nullcontext() if last or world == 1 else trained.no_sync():
                    loss_sum = objective.loss_sum(trained, inputs)
                    (loss_sum * scale).backward()
                window_loss += loss_sum.detach() * (scale / world)
            torch.nn.utils.clip_grad_norm_(parameters, spec.grad_clip)
            optimizer.step()
            decay = min(spec.ema_decay, (1 + state.step) / (10 + state.step))
            with torch.no_grad():  # one fused call instead of a Python loop over parameters
                torch._foreach_lerp_(averages, parameters, 1.0 - decay)
            state.step += 1
            state.samples_seen += spec.batch_size
            window_steps += 1
            checkpoint = state.step % spec.checkpoint_every == 0 or state.step == spec.steps
            if checkpoint or time.monotonic() - driver_checked >= DRIVER_CHECK_SECONDS:
                driver_checked = time.monotonic()
                check_driver(layout, spec.epoch)  # not in its log: a newer worker owns it

            if state.step % spec.log_every == 0 or state.step == spec.steps:
                if world > 1:  # every worker saw a slice: the batch loss is their sum
                    dist.all_reduce(window_loss)
                elapsed = time.perf_counter() - window_start
                loss_value = float(window_loss) / window_steps
                if not math.isfinite(loss_value):  # NaN or inf anywhere in the window
                    raise fail(diverged("loss", state.step))
                row = {"step": state.step, "loss": loss_value, "lr": lr,
                       "step_time": elapsed / window_steps,
                       "samples_per_s": window_steps * spec.batch_size / max(elapsed, 1e-9)}
                if metrics is not None:
                    metrics.append(row)
                tracker.log(row, state.step)
                if report:
                    report({"expert": spec.expert, **row, "total": spec.steps,
                            "attempt": spec.attempt, "resumed_from": resumed_from, **hardware})
                stored(block=False)  # a failed write surfaces here, not an interval later
                expert_log.write(f"step {state.step}/{spec.steps} loss {loss_value:.4f} "
                                 f"lr {lr:.2e} {row['samples_per_s']:.1f} samples/s")
                expert_log.flush(every=10.0)
                window_loss.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if lead and state.step in snapshot_at:
                if not all_finite(parameters + averages):
                    raise fail(diverged("weights", state.step))
                # Before this step's checkpoint: one resumed from it finds the snapshot.
                _write_snapshot(spec, layout, model, ema, state, flops_per_sample)
                expert_log.write(f"snapshot at step {state.step}")
            if lead and checkpoint:
                started = time.perf_counter()
                # Never commit a diverged state: a retry resumes from the last good one.
                if not math.isfinite(float(window_loss)):
                    raise fail(diverged("loss", state.step))
                if not all_finite(parameters + averages):
                    raise fail(diverged("weights", state.step))
                stored(block=True)  # one write at a time; the previous one must be complete
                files = snapshot(model, ema, optimizer, generator, state)
                metric_rows = list(metrics.rows) if metrics is not None else []
                writer.submit(state.step, functools.partial(
                    _store_checkpoint, layout, spec, state.step, files, metrics, metric_rows))
                if not spec.async_checkpoints:
                    stored(block=True)
                expert_log.write(f"checkpoint at step {state.step} (training stalled "
                                 f"{time.perf_counter() - started:.4f} s)")
                expert_log.flush()

        tracker.finish()
        artifacts = (write_final(spec, layout, model, ema, {**objective.meta(), **hardware},
                                 state, flops_per_sample, loss_value, rows, note)
                     if lead else {})
        stored(block=True)  # the last checkpoint is stored before the result says done
    finally:
        writer.close()
    expert_log.write(f"finished at step {state.step}, loss {loss_value:.4f}")
    expert_log.flush()
    return ExpertResult(expert=spec.expert, steps=state.step, samples_seen=state.samples_seen,
                        train_flops=flops_per_sample * state.samples_seen, final_loss=loss_value,
                        resumed_from=resumed_from, artifacts=artifacts)


def shard_urls(spec: ExpertSpec, layout: RunLayout) -> list[str]:
    """An expert trains on its own shard; a seed model names every cluster's."""
    return [layout.shard(cluster) for cluster in (spec.shard_clusters or (spec.expert,))]


def write_final(spec: ExpertSpec, layout: RunLayout, model: torch.nn.Module,
                ema: torch.nn.Module, objective_meta: dict[str, Any], state: TrainState,
                flops_per_sample: float, loss: float, rows: int,
                log: Callable[[str], None] = print) -> dict[str, str]:
    """The final weights are the EMA (`model.safetensors`); the raw weights of the last step
    lie beside them (`raw.safetensors`), for runs too short for the EMA to catch up.
    The artifacts include every snapshot, `meta.json` of the final folder last."""
    folder = layout.final(spec.expert)
    weights = storage.join(folder, "model.safetensors")
    raw = storage.join(folder, "raw.safetensors")
    meta = storage.join(folder, "meta.json")
    check_epoch(layout, spec.epoch, folder)
    artifacts = snapshot_artifacts(spec, layout, log)
    artifacts[weights] = storage.write_bytes(weights, save_tensors(
        {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}))
    artifacts[raw] = storage.write_bytes(raw, save_tensors(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    check_epoch(layout, spec.epoch, folder)  # again: storing the weights takes a while
    artifacts[meta] = storage.write_json(meta, {
        "expert": spec.expert, "model": spec.model, "model_kwargs": spec.model_kwargs,
        **objective_meta, "steps": state.step, "rows": rows,
        "samples_seen": state.samples_seen, "train_flops": flops_per_sample * state.samples_seen,
        "final_loss": loss, "island": spec.island, "weights_sha256": artifacts[weights],
        "raw_sha256": artifacts[raw], "lr_schedule": spec.lr_schedule})
    return {url.removeprefix(layout.root).lstrip("/"): sha for url, sha in artifacts.items()}
