"""The distill stage: one student with the experts' architecture (or another width) trained
on the ensemble's outputs, as Decentralized Diffusion Models distils its experts.

The student trains in the experts' own loop (worker/train.py) with an objective the run's
modality supplies (images: the ensemble's velocity; text: its next-byte mixture), on every
cluster's training shard, in `distill/`: checkpoints, log and metrics as an expert's, its
final (EMA) weights and meta.json at the top. So a killed distill resumes from its last
checkpoint and ends with the bytes an uninterrupted one would have."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from orchestrator.ensemble import Routing, check_strategy
from orchestrator.modalities import modality_of
from orchestrator.state.config import RunConfig
from orchestrator.state.manifest import Manifest, now
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from worker.train import ExpertSpec, train_expert

STAGE = "distill"
STUDENT = 0  # the slot the experts' loop trains it in: its paths are StudentLayout's


@dataclass(frozen=True)
class DistillOptions:
    """What `islands distill` was asked for; None: the experts' setting."""

    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    threads: int | None = None
    width: int | None = None
    routing: str = "full"
    top_k: int | None = None


class StudentLayout(RunLayout):
    """The run's paths, with an expert's folder and its final folder both `distill/`."""

    def expert(self, expert: int) -> str:
        return storage.join(self.root, STAGE)

    def final(self, expert: int) -> str:
        return self.expert(expert)


def check_ensemble(manifest: Manifest) -> None:
    """The teacher must be whole: every expert's and the router's artifacts verified."""
    for stage in ("experts", "router"):
        if not manifest.stage_done(stage):
            state = manifest.stage(stage)["state"]
            raise InputError(manifest.layout.root, f"the {stage} stage is {state}: distill "
                             "needs a finished ensemble (islands resume RUN first)")


def student_spec(config: RunConfig, manifest: Manifest, options: DistillOptions) -> ExpertSpec:
    spec = modality_of(config)
    if spec.student_recipe is None:
        raise InputError("data.modality", f"{spec.name} runs cannot be distilled")
    if options.lr is not None and not options.lr > 0:
        raise InputError("--lr", f"{options.lr}: expected a learning rate above 0")
    clusters = len(manifest.experts)
    top_k = options.top_k or min(config.inference.top_k, clusters)
    check_strategy(options.routing, "--routing")
    if options.routing == "topk" and top_k > clusters:
        raise InputError("--top-k", f"is {top_k} but the run has {clusters} experts; "
                         f"expected at most {clusters}")
    expert_meta = json.loads(manifest.read_verified("experts/expert-0/final/meta.json"))
    recipe = spec.student_recipe(config, expert_meta, options.width,
                                 Routing(options.routing, top_k), manifest.layout.root)
    cfg = config.experts
    steps = options.steps or cfg.steps
    return ExpertSpec(
        expert=STUDENT, model=recipe.model, model_kwargs=dict(recipe.model_kwargs),
        objective=recipe.objective, objective_kwargs=dict(recipe.objective_kwargs),
        imports=recipe.imports, steps=steps, batch_size=options.batch_size or cfg.batch_size,
        lr=options.lr or cfg.lr, warmup_steps=min(cfg.warmup_steps, steps // 10),
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
        checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
        async_checkpoints=cfg.async_checkpoints, threads=options.threads or cfg.threads,
        log_every=cfg.log_every, seed=config.seed if options.seed is None else options.seed,
        shard_clusters=tuple(manifest.experts), epoch=manifest.epoch)


def settings_of(spec: ExpertSpec) -> dict[str, Any]:
    """What decides the student's bytes: a distill asked for other settings starts over."""
    return {"model": spec.model, "model_kwargs": spec.model_kwargs, "steps": spec.steps,
            "batch_size": spec.batch_size, "lr": spec.lr, "seed": spec.seed,
            "routing": spec.objective_kwargs["strategy"],
            "top_k": spec.objective_kwargs["top_k"]}


def distill(config: RunConfig, manifest: Manifest, options: DistillOptions, console: Console,
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or resume, or find done) the run's student; returns its distill/meta.json."""
    check_ensemble(manifest)
    spec = student_spec(config, manifest, options)
    settings = settings_of(spec)
    layout = StudentLayout(manifest.layout.root)
    entry = manifest.stage(STAGE)
    if entry.get("settings") == settings and manifest.stage_done(STAGE):
        console.print(f"distill: done already ({spec.steps} steps), verified")
        return json.loads(manifest.read_verified(f"{STAGE}/meta.json"))
    folder = layout.expert(STUDENT)
    if entry.get("settings") not in (None, settings) and storage.exists(folder):
        console.print(f"distill: other settings than the recorded student's: {folder} "
                      "starts over")
        storage.remove(folder)
    manifest.enter_stage(STAGE).update(state="running", started=now(), settings=settings,
                                       artifacts={})
    manifest.save()

    def report(row: dict[str, Any]) -> None:
        if row["step"] > row["resumed_from"]:
            console.print(f"distill: step {row['step']}/{row['total']} loss "
                          f"{row['loss']:.4f}, {row['samples_per_s']:.1f} samples/s",
                          highlight=False)
        if progress is not None:
            progress(row)

    def note(line: str) -> None:
        console.print(line.replace(f"expert {STUDENT}:", "distill:"), highlight=False)

    result = train_expert(spec, layout, report, note)
    meta_path = f"{STAGE}/meta.json"
    meta = json.loads(storage.read_bytes(storage.join(layout.root, meta_path)))
    for key in ("expert", "island"):
        meta.pop(key, None)
    # The trainer counted the student's forward and backward; the teacher's forward
    # passes on every sample are a cost of distilling too.
    teacher = meta["teacher"]
    teacher_flops = teacher["forward_flops"] * meta["samples_seen"]
    meta.update(student_train_flops=meta["train_flops"], teacher_flops=teacher_flops,
                train_flops=meta["train_flops"] + teacher_flops)
    artifacts = dict(result.artifacts)
    artifacts[meta_path] = storage.write_json(storage.join(layout.root, meta_path), meta)
    manifest.finish_stage(STAGE, artifacts, steps=meta["steps"], train_flops=meta["train_flops"],
                          teacher_routing=teacher["strategy"], settings=settings,
                          resumed_from=result.resumed_from)
    console.print(f"distill: {storage.join(layout.root, STAGE)} ({meta['steps']} steps, "
                  f"final loss {meta['final_loss']:.4f}, teacher {teacher['strategy']})",
                  highlight=False)
    return meta
