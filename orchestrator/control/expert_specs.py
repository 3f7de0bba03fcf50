"""What one expert's training attempt is told: its model, objective, steps and island,
as the plain `ExpertSpec` the worker takes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from orchestrator.state.config import IslandSpec, RunConfig
from orchestrator.state.manifest import Manifest
from runstore import storage
from runstore.layout import RunLayout
from worker.train import ExpertSpec


def wandb_dir(layout: RunLayout) -> str:
    """wandb writes to a local folder: the run directory when it is local, else a cache."""
    fs, path = storage.filesystem(layout.root)
    if isinstance(fs, LocalFileSystem):
        return f"{path}/wandb"
    return str(Path.home() / ".cache" / "islands" / "wandb" / path.strip("/").replace("/", "_"))


@dataclass(frozen=True)
class ExpertRecipe:
    """What a modality decides about its experts: the architecture and what it learns.
    `imports` are modules a worker imports first, so that a modality registered outside
    this package (its models and objectives) is known in the worker's process too."""

    model: str
    model_kwargs: dict[str, Any]
    objective: str
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    imports: tuple[str, ...] = ()


def expert_spec(config: RunConfig, layout: RunLayout, expert: int, island: IslandSpec,
                recipe: ExpertRecipe, **overrides: Any) -> ExpertSpec:
    """Expert K's spec on `island`; expert -1 is the Branch-Train-Merge seed model."""
    cfg = config.experts
    name = "seed" if expert < 0 else f"expert-{expert}"
    tracking = {"mode": config.tracking.wandb}
    if config.tracking.wandb != "disabled":
        run_key = storage.sha256_bytes(layout.root.encode())[:8]
        tracking.update(project=config.tracking.project, group=config.run,
                        name=f"{config.run}-{name}", id=f"{config.run}-{name}-{run_key}",
                        directory=wandb_dir(layout))
    spec = ExpertSpec(
        expert=expert, model=recipe.model, model_kwargs=dict(recipe.model_kwargs),
        objective=recipe.objective, objective_kwargs=dict(recipe.objective_kwargs),
        imports=recipe.imports,
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
        checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
        async_checkpoints=cfg.async_checkpoints,
        lr_schedule=cfg.lr_schedule, snapshot_at=cfg.snapshot_at,
        threads=island.threads(cfg.threads), log_every=cfg.log_every,
        seed=config.seed * 1000 + expert + 1, island=island.name, tracking=tracking,
        memory_gb=island.worker_memory_gb, device="cuda" if island.accelerators else "cpu",
        hardware=island.model_dump(mode="json", exclude_none=True))
    return replace(spec, **overrides) if overrides else spec


def expert_steps(config: RunConfig, sizes: list[int]) -> dict[int, int]:
    """Steps of each expert: the same for all, or in proportion to its shard's rows with
    the same total."""
    if config.experts.steps_by == "fixed":
        return {k: config.experts.steps for k in range(len(sizes))}
    total = sum(sizes)
    return {k: max(1, round(config.experts.steps * len(sizes) * rows / total))
            for k, rows in enumerate(sizes)}


def seed_overrides(config: RunConfig, clusters: int) -> dict[str, Any]:
    """The Branch-Train-Merge seed: `seed_steps` on every cluster's shard, at
    `seed_batch_size` when set."""
    batch = config.experts.seed_batch_size
    return {"steps": config.experts.seed_steps, "shard_clusters": tuple(range(clusters)),
            **({"batch_size": batch} if batch else {})}


def branch_overrides(manifest: Manifest) -> dict[str, Any]:
    """Experts start from the seed's final weights when the run has a seed model."""
    if not manifest.stage("seed")["artifacts"]:
        return {}
    return {"init_from": storage.join(manifest.layout.final(-1), "model.safetensors")}
