"""The experts stage: place experts on islands, launch them on Ray, watch, retry."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from fsspec.implementations.local import LocalFileSystem
from rich.console import Console
from rich.live import Live

from orchestrator.cluster import island_resource
from orchestrator.config import RunConfig
from orchestrator.manifest import Manifest
from orchestrator.placement import ExpertWork, place
from orchestrator.progress import ProgressBoard, expert_progress
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from worker.train import ExpertSpec, train_expert


@ray.remote(max_retries=0)
def train_on_island(spec: ExpertSpec, root: str, board: Any) -> dict[str, Any]:
    """Runs in a Ray worker on the expert's island; the driver handles retries itself so
    every attempt and its reason land in the manifest."""
    result = train_expert(spec, RunLayout(root), progress=lambda row: board.report.remote(row))
    return asdict(result)


def wandb_dir(layout: RunLayout) -> str:
    """wandb writes to a local folder: the run directory when it is local, else a cache."""
    fs, path = storage.filesystem(layout.root)
    if isinstance(fs, LocalFileSystem):
        return f"{path}/wandb"
    return str(Path.home() / ".cache" / "islands" / "wandb" / path.strip("/").replace("/", "_"))


def expert_spec(config: RunConfig, layout: RunLayout, expert: int, island: str,
                image_channels: int) -> ExpertSpec:
    cfg = config.experts
    tracking = {"mode": config.tracking.wandb}
    if config.tracking.wandb != "disabled":
        tracking.update(project=config.tracking.project, group=config.run,
                        name=f"{config.run}-expert-{expert}",
                        directory=wandb_dir(layout))
    return ExpertSpec(
        expert=expert, model=cfg.model,
        model_kwargs={"image_channels": image_channels, "channels": cfg.channels,
                      "channel_mult": list(cfg.channel_mult), "patch": cfg.patch},
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
        checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
        threads=cfg.threads, log_every=cfg.log_every, seed=config.seed * 1000 + expert,
        island=island, tracking=tracking)


def run_experts(config: RunConfig, manifest: Manifest, console: Console) -> None:
    layout = manifest.layout
    stats = manifest.stage("partition")["stats"]
    todo = [k for k in manifest.experts if not manifest.expert_done(k)]
    if not todo:
        return
    islands = config.islands.specs()
    work = [ExpertWork(k, stats["sizes"][k], config.experts.steps) for k in todo]
    placement = place(work, islands)
    board = ProgressBoard.remote()
    image_channels = stats["image_shape"][-1]
    running: dict[ray.ObjectRef, int] = {}

    def launch(expert: int, island: str) -> None:
        spec = expert_spec(config, layout, expert, island, image_channels)
        ref = train_on_island.options(
            num_cpus=spec.threads, resources={island_resource(island): 1},
            name=f"expert-{expert}").remote(spec, layout.root, board)
        running[ref] = expert
        manifest.start_attempt(expert, island)

    progress = expert_progress()
    bars = {k: progress.add_task(f"expert {k}@{placement[k]}", total=config.experts.steps,
                                 status="queued") for k in todo}
    for k in todo:
        launch(k, placement[k])
    with Live(progress, console=console, refresh_per_second=4, transient=False) as live:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for expert, row in ray.get(board.snapshot.remote()).items():
                if expert in bars:
                    progress.update(bars[expert], completed=row["step"],
                                    status=f"loss {row['loss']:.4f} "
                                           f"{row['samples_per_s']:.0f}/s")
            for ref in ready:
                expert = running.pop(ref)
                _collect(ref, expert, config, manifest, progress, bars, launch, placement)
        live.refresh()
    ray.kill(board)
    failed = [k for k in todo if manifest.expert(k)["state"] != "done"]
    if failed:
        raise RuntimeError(f"experts {failed} failed after all retries; see manifest.json")


def _collect(ref: ray.ObjectRef, expert: int, config: RunConfig, manifest: Manifest,
             progress: Any, bars: dict[int, Any], launch: Any, placement: dict[int, str]) -> None:
    try:
        result = ray.get(ref)
    except InputError as err:
        manifest.end_attempt(expert, "failed", f"input error: {err}",
                             manifest.expert(expert)["step"])
        raise InputError(err.where, err.problem) from None
    except (ray.exceptions.RayError, Exception) as err:  # worker died, OOM, node lost, bug
        attempts = len(manifest.expert(expert)["attempts"])
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        retry = attempts <= config.fault_tolerance.max_retries
        manifest.end_attempt(expert, "pending" if retry else "failed", reason,
                             manifest.expert(expert)["step"])
        progress.update(bars[expert], status=f"[red]attempt {attempts} failed: {reason[:60]}")
        if retry:
            time.sleep(min(2.0 ** attempts, 10.0))
            launch(expert, placement[expert])
        return
    manifest.end_attempt(expert, "done", "finished", result["steps"],
                         artifacts=result["artifacts"], samples_seen=result["samples_seen"],
                         train_flops=result["train_flops"], final_loss=result["final_loss"],
                         resumed_from=result["resumed_from"])
    progress.update(bars[expert], completed=result["steps"],
                    status=f"[green]done, loss {result['final_loss']:.4f}")
