"""The experts stage: place experts on islands, launch them on Ray, watch, retry."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
from fsspec.implementations.local import LocalFileSystem
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console
from rich.live import Live

from orchestrator.cluster import island_resource, present_islands
from orchestrator.config import RunConfig
from orchestrator.manifest import Manifest
from orchestrator.placement import ExpertWork, place
from orchestrator.progress import ProgressBoard, expert_progress
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from worker.train import ExpertSpec, train_expert


class RunCancelled(Exception):
    """`islands cancel` asked this run to stop; its checkpoints stay for `islands resume`."""


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


def model_kwargs(config: RunConfig, image_channels: int) -> dict[str, Any]:
    cfg = config.experts
    if config.model == "byte_lm":
        return {"context": cfg.context, "width": cfg.width, "depth": cfg.depth,
                "heads": cfg.heads}
    return {"image_channels": image_channels, "channels": cfg.channels,
            "channel_mult": list(cfg.channel_mult), "patch": cfg.patch}


def expert_spec(config: RunConfig, layout: RunLayout, expert: int, island: str,
                image_channels: int, **overrides: Any) -> ExpertSpec:
    """Expert K's spec; expert -1 is the Branch-Train-Merge seed model."""
    cfg = config.experts
    name = "seed" if expert < 0 else f"expert-{expert}"
    tracking = {"mode": config.tracking.wandb}
    if config.tracking.wandb != "disabled":
        run_key = storage.sha256_bytes(layout.root.encode())[:8]
        tracking.update(project=config.tracking.project, group=config.run,
                        name=f"{config.run}-{name}", id=f"{config.run}-{name}-{run_key}",
                        directory=wandb_dir(layout))
    text = config.data.modality == "text"
    spec = ExpertSpec(
        expert=expert, model=config.model, model_kwargs=model_kwargs(config, image_channels),
        objective="lm" if text else "flow",
        objective_kwargs={"context": cfg.context} if text else {},
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
        checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
        threads=cfg.threads, log_every=cfg.log_every, seed=config.seed * 1000 + expert + 1,
        island=island, tracking=tracking)
    return replace(spec, **overrides) if overrides else spec


def seed_overrides(config: RunConfig, clusters: int) -> dict[str, Any]:
    """The Branch-Train-Merge seed: `seed_steps` on every cluster's shard."""
    return {"steps": config.experts.seed_steps, "shard_clusters": tuple(range(clusters))}


def branch_overrides(manifest: Manifest) -> dict[str, Any]:
    """Experts start from the seed's final weights when the run has a seed model."""
    if not manifest.stage("seed")["artifacts"]:
        return {}
    return {"init_from": storage.join(manifest.layout.final(-1), "model.safetensors")}


class ExpertsStage:
    """Launches the given unfinished experts on their islands and drives each to done or
    failed. Expert -1 is the Branch-Train-Merge seed model."""

    def __init__(self, config: RunConfig, manifest: Manifest, experts: list[int],
                 overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.manifest = manifest
        self.overrides = overrides or {}
        stats = manifest.stage("partition")["stats"]
        self.image_channels = stats.get("image_shape", [0])[-1]
        self.todo = [k for k in experts if not manifest.expert_done(k)]
        for expert in self.todo:
            attempts = manifest.expert(expert)["attempts"]
            if attempts and "ended" not in attempts[-1]:  # its driver died mid-attempt
                manifest.end_attempt(expert, "pending", "driver stopped during the attempt",
                                     attempts[-1].get("reported_step",
                                                      manifest.expert(expert)["step"]))
        self.steps = self.overrides.get("steps", config.experts.steps)
        work = [ExpertWork(k, stats["sizes"][k] if k >= 0 else sum(stats["sizes"]), self.steps)
                for k in self.todo]
        self.placement = place(work, config.islands.specs()) if work else {}
        self.running: dict[ray.ObjectRef, int] = {}
        self.island_of: dict[ray.ObjectRef, str] = {}
        self.cancelled: dict[ray.ObjectRef, str] = {}  # why the driver cancelled a task
        self.present = {spec.name for spec in config.islands.specs()}
        self.checked = time.monotonic()
        self.progress = expert_progress()
        self.bars = {k: self.progress.add_task(
            f"{'seed' if k < 0 else f'expert {k}'}@{self.placement[k]}", total=self.steps,
            status="queued") for k in self.todo}
        self.board: Any = None
        self.saved = time.monotonic()

    def move_off_lost_island(self, expert: int) -> str:
        """The expert's island left the cluster: pick the present island that would finish
        it soonest, counting what already runs there."""
        candidates = [spec for spec in self.config.islands.specs() if spec.name in self.present]
        if not candidates:
            raise RuntimeError(f"no island left to train expert {expert} on")
        load = {spec.name: 0 for spec in candidates}
        for island in self.island_of.values():
            if island in load:
                load[island] += 1
        best = min(candidates, key=lambda spec: ((load[spec.name] + 1) / (spec.slots * spec.speed),
                                                 spec.name))
        self.placement[expert] = best.name
        self.progress.update(self.bars[expert], description=f"expert {expert}@{best.name}")
        return best.name

    def watch(self) -> None:
        """Every 2 s: stop if the user asked to cancel; cancel tasks pinned to an island
        that left (they would wait forever), so they fail and are relaunched elsewhere."""
        if time.monotonic() - self.checked < 2.0:
            return
        self.checked = time.monotonic()
        if storage.exists(self.manifest.layout.cancel_request):
            self.stop_for_cancel()
        self.present = present_islands()
        for ref, island in list(self.island_of.items()):
            if island not in self.present and ref in self.running:
                ray.cancel(ref, force=True)
                self.island_of[ref] = f"{island} (lost)"
                self.cancelled[ref] = f"island {island} left the cluster"

    def stop_for_cancel(self) -> None:
        for ref, expert in self.running.items():
            ray.cancel(ref, force=True)
            entry = self.manifest.expert(expert)
            step = entry["attempts"][-1].get("reported_step", entry["step"])
            self.manifest.end_attempt(expert, "pending", "cancelled by the user", step)
        self.running.clear()
        raise RunCancelled(self.manifest.layout.root)

    def launch(self, expert: int) -> None:
        island = self.placement[expert]
        if island not in self.present:
            island = self.move_off_lost_island(expert)
        attempt = len(self.manifest.expert(expert)["attempts"]) + 1
        spec = expert_spec(self.config, self.manifest.layout, expert, island,
                           self.image_channels, attempt=attempt, **self.overrides)
        ref = train_on_island.options(
            num_cpus=spec.threads, resources={island_resource(island): 1},
            name=f"expert-{expert}").remote(spec, self.manifest.layout.root, self.board)
        self.running[ref] = expert
        self.island_of[ref] = island
        self.manifest.start_attempt(expert, island)

    def run(self, console: Console) -> None:
        if not self.todo:
            return
        # Pinned to the driver's node: an island's node may vanish, the driver's may not.
        self.board = ProgressBoard.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
        for expert in self.todo:
            self.launch(expert)
        try:
            with Live(self.progress, console=console, refresh_per_second=4) as live:
                while self.running:
                    ready, _ = ray.wait(list(self.running), num_returns=1, timeout=0.5)
                    # Progress is best effort; results come from the tasks themselves.
                    with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
                        self.show(ray.get(self.board.snapshot.remote(), timeout=10))
                    for ref in ready:
                        self.island_of.pop(ref, None)
                        self.collect(ref, self.running.pop(ref))
                    self.watch()
                live.refresh()
        finally:
            for ref in self.running:
                ray.cancel(ref, force=True)
            ray.kill(self.board)
        failed = [k for k in self.todo if self.manifest.expert(k)["state"] != "done"]
        if failed:
            raise RuntimeError(f"experts {failed} failed after all retries; see manifest.json")

    def show(self, rows: dict[int, dict[str, Any]]) -> None:
        for expert, row in rows.items():
            entry = self.manifest.expert(expert)
            if expert not in self.bars or entry["state"] != "running":
                continue
            if row["attempt"] != len(entry["attempts"]):
                continue  # the last report of an attempt that already ended
            entry["attempts"][-1].update(resumed_from=row["resumed_from"],
                                         reported_step=row["step"])
            entry["step"] = row["step"]
            status = (f"loss {row['loss']:.4f} {row['samples_per_s']:.0f}/s"
                      if row["samples_per_s"] else f"starting at step {row['step']}")
            self.progress.update(self.bars[expert], completed=row["step"], status=status)
        if time.monotonic() - self.saved > 5.0:  # live steps for `islands status`
            self.manifest.save()
            self.saved = time.monotonic()

    def collect(self, ref: ray.ObjectRef, expert: int) -> None:
        entry = self.manifest.expert(expert)
        try:
            result = ray.get(ref)
        except InputError as err:  # bad shard or checkpoint: retrying cannot help
            self.manifest.end_attempt(expert, "failed", f"input error: {err}", entry["step"])
            raise InputError(err.where, err.problem) from None
        except Exception as err:  # worker died, OOM, node lost, a bug in training
            attempts = len(entry["attempts"])
            first_line = next(iter(str(err).splitlines()), "")
            reason = self.cancelled.pop(ref, None) or \
                f"{type(err).__name__}: {first_line[:200]}".rstrip(": ")
            retry = attempts <= self.config.fault_tolerance.max_retries
            # The step the attempt last reported: its progress up to there is at risk.
            step = entry["attempts"][-1].get("reported_step", entry["step"])
            self.manifest.end_attempt(expert, "pending" if retry else "failed", reason, step)
            self.progress.update(self.bars[expert],
                                 status=f"[red]attempt {attempts} failed: {reason[:50]}")
            if retry:
                time.sleep(min(2.0**attempts, 10.0))
                self.present = present_islands()  # a dead node's island is gone by now
                self.launch(expert)
            return
        entry["attempts"][-1]["resumed_from"] = result["resumed_from"]
        self.manifest.end_attempt(expert, "done", "finished", result["steps"],
                                  artifacts=result["artifacts"],
                                  samples_seen=result["samples_seen"],
                                  train_flops=result["train_flops"],
                                  final_loss=result["final_loss"],
                                  resumed_from=result["resumed_from"])
        self.progress.update(self.bars[expert], completed=result["steps"],
                             status=f"[green]done, loss {result['final_loss']:.4f}")


def run_experts(config: RunConfig, manifest: Manifest, console: Console) -> None:
    ExpertsStage(config, manifest, manifest.experts, branch_overrides(manifest)).run(console)


def run_seed(config: RunConfig, manifest: Manifest, console: Console) -> None:
    ExpertsStage(config, manifest, [-1], seed_overrides(config, config.clusters)).run(console)
