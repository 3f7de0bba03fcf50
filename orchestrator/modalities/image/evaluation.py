"""Image evaluation (DDM): held-out flow-matching loss per strategy and per expert, router
accuracy by noise level, sampling cost, sample grids; a monolith baseline beside it."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import torch
from PIL import Image
from rich.table import Table

from orchestrator.ensemble import Ensemble, Routing
from orchestrator.ensemble.experts import load_student
from orchestrator.evaluate.pictures import figure_png, grid_png, strategy_bars, subplots
from orchestrator.evaluate.report import add_model_rows, eval_table
from orchestrator.modalities.image.data import LabelledImages, read_split
from orchestrator.modalities.image.sampling import (
    add_velocities,
    load_ensemble,
    sample,
    velocity,
)
from orchestrator.state.config import RunConfig
from orchestrator.state.manifest import Manifest
from runstore.split_sample import EVAL_ROWS
from worker.flow import noisy


def heldout_subset(manifest: Manifest, clusters: int, rows: int, seed: int) -> LabelledImages:
    """`rows` held-out rows drawn from a seeded sample of at least EVAL_ROWS; only those
    rows are moved to model space."""
    data = read_split(manifest.layout, clusters, "heldout", max(EVAL_ROWS, rows), seed)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(data), generator=generator)[:rows].sort().values
    return LabelledImages(data.x0(keep), data.cluster[keep])


@torch.no_grad()
def flow_losses(velocity: Any, data: LabelledImages, seed: int,
                batch: int = 256) -> torch.Tensor:
    """Per-row flow-matching loss under a fixed draw of (t, noise), so runs compare fairly."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(len(data.x0), generator=generator)
    noise = torch.randn(data.x0.shape, generator=generator)
    losses = []
    for start in range(0, len(data.x0), batch):
        part = slice(start, start + batch)
        x0, tt, ee = data.x0[part], t[part], noise[part]
        losses.append(((velocity(noisy(x0, tt, ee), tt) - (ee - x0)) ** 2).flatten(1).mean(1))
    return torch.cat(losses)


def evaluate(config: RunConfig, manifest: Manifest) -> tuple[dict[str, Any], dict[str, bytes]]:
    torch.set_num_threads(config.router.threads)
    ensemble, metas = load_ensemble(manifest)
    clusters = ensemble.clusters
    data = heldout_subset(manifest, clusters, config.eval.heldout_rows, config.seed)
    strategies = list(config.eval.strategies) if clusters > 1 else ["full"]
    top_k = min(config.inference.top_k, clusters)
    report: dict[str, Any] = {"run": config.run, "modality": "image", "clusters": clusters,
                              "heldout_rows": len(data.x0), "strategies": {}, "experts": []}
    pictures: dict[str, bytes] = {}
    for strategy in strategies:
        manifest.check_cancel()
        routing = Routing(strategy, top_k)
        losses = flow_losses(lambda x, t, r=routing: velocity(ensemble, x, t, r), data,
                             config.seed)
        ensemble.expert_rows = 0
        noise = torch.randn((config.inference.samples, *data.x0.shape[1:]),
                            generator=torch.Generator().manual_seed(config.seed + 7))
        started = time.perf_counter()
        samples = sample(ensemble, noise, config.inference.sample_steps,
                         Routing(strategy, top_k))
        seconds = time.perf_counter() - started
        report["strategies"][strategy] = {
            "heldout_loss": losses.mean().item(),
            "sample_seconds": seconds,
            "samples": len(noise),
            "sample_steps": config.inference.sample_steps,
            "expert_calls_per_sample": ensemble.expert_rows / len(noise),
        }
        pictures[f"samples-{strategy}.png"] = grid_png(samples)
    if manifest.stage_done("distill"):
        report["distill"], pictures["samples-distill.png"] = student_row(config, manifest, data)

    for expert, meta in enumerate(metas):
        manifest.check_cancel()
        own = data.cluster == expert
        row = {"expert": expert, "rows": meta["rows"], "steps": meta["steps"],
               "train_flops": meta["train_flops"], "island": meta.get("island")}
        if own.any():
            subset = LabelledImages(data.x0[own], data.cluster[own])
            row["own_cluster_loss"] = flow_losses(ensemble.experts[expert], subset,
                                                  config.seed).mean().item()
            if clusters > 1:
                others = LabelledImages(data.x0[~own], data.cluster[~own])
                row["other_clusters_loss"] = flow_losses(ensemble.experts[expert], others,
                                                         config.seed).mean().item()
        report["experts"].append(row)

    router_stage = manifest.stage("router")
    expert_flops = sum(meta["train_flops"] for meta in metas)
    router_flops = router_stage.get("train_flops", 0.0)
    report["train_flops"] = {"experts": expert_flops, "router": router_flops,
                             "router_share": router_flops / max(expert_flops + router_flops, 1)}
    if clusters > 1:
        router_meta = json.loads(manifest.read_verified("router/meta.json"))
        report["router_accuracy_by_noise"] = router_meta["accuracy_by_noise"]
    report["heldout_loss"] = report["strategies"][config.inference.strategy
                                                  if clusters > 1 else "full"]["heldout_loss"]
    return report, pictures


def student_row(config: RunConfig, manifest: Manifest,
                data: LabelledImages) -> tuple[dict[str, Any], bytes]:
    """The distilled student on the strategies' held-out draw and sampling noise: one
    model call per denoising step, the inference cost of top1."""
    student, meta = load_student(manifest)
    alone = Ensemble([student], None, add_velocities)
    losses = flow_losses(student, data, config.seed)
    noise = torch.randn((config.inference.samples, *data.x0.shape[1:]),
                        generator=torch.Generator().manual_seed(config.seed + 7))
    started = time.perf_counter()
    samples = sample(alone, noise, config.inference.sample_steps, Routing("full"))
    row = {"heldout_loss": losses.mean().item(),
           "sample_seconds": time.perf_counter() - started, "samples": len(noise),
           "sample_steps": config.inference.sample_steps,
           "expert_calls_per_sample": alone.expert_rows / len(noise),
           "steps": meta["steps"], "teacher_routing": meta["teacher"]["strategy"],
           "model_kwargs": meta["model_kwargs"], "train_flops": meta["train_flops"]}
    return row, grid_png(samples)


def attach_baseline(report: dict[str, Any], baseline: dict[str, Any]) -> None:
    report["baseline"] = {
        "run": baseline["run"],
        "heldout_loss": baseline["strategies"]["full"]["heldout_loss"]
        if baseline["clusters"] == 1 else baseline["heldout_loss"],
        "train_flops": baseline["train_flops"]["experts"] + baseline["train_flops"]["router"],
        "sample_seconds": next(iter(baseline["strategies"].values()))["sample_seconds"],
    }
    ours = report["train_flops"]["experts"] + report["train_flops"]["router"]
    report["baseline"]["compute_ratio"] = ours / max(report["baseline"]["train_flops"], 1)


def report_tables(report: dict[str, Any]) -> list[Table]:
    table = eval_table(report, f"{report['heldout_rows']} held-out rows",
                       ("held-out loss", "expert calls/sample", "sample s"))
    add_model_rows(table, report, lambda row: [
        f"{row['heldout_loss']:.4f}", f"{row['expert_calls_per_sample']:.1f}",
        f"{row['sample_seconds']:.2f}"])
    for row in report["experts"]:
        note = (f"on other clusters {row['other_clusters_loss']:.4f}"
                if "other_clusters_loss" in row else "")
        table.add_row(f"expert {row['expert']}, own cluster",
                      f"{row.get('own_cluster_loss', float('nan')):.4f}", "", "", note)
    baseline = report.get("baseline")
    if baseline:
        table.add_row(f"baseline {baseline['run']}", f"{baseline['heldout_loss']:.4f}", "",
                      f"{baseline['sample_seconds']:.2f}",
                      f"our/its training FLOPs {baseline['compute_ratio']:.2f}x")
    share = report["train_flops"]["router_share"]
    table.caption = f"router share of training FLOPs: {100 * share:.1f}%"
    tables = [table]
    accuracy = report.get("router_accuracy_by_noise")
    if accuracy:
        router = Table(title="router accuracy by noise level (t = 1 is pure noise)")
        router.add_column("t", justify="right")
        router.add_column("accuracy", justify="right")
        for row in accuracy:
            router.add_row(f"{row['t']:.2f}", f"{row['accuracy']:.3f}")
        tables.append(router)
    return tables


def report_png(report: dict, pictures: dict[str, bytes]) -> bytes:
    grid = next(iter(pictures.values()), None)  # the first strategy's sample grid
    panels = 4 if grid else 3
    figure, axes = subplots(panels, (5 * panels, 4.2))
    router = report.get("router_accuracy_by_noise") or []
    if router:
        axes[0].plot([r["t"] for r in router], [r["accuracy"] for r in router], marker="o")
        axes[0].axhline(1.0 / report["clusters"], color="grey", linestyle="--", label="chance")
        axes[0].legend()
    axes[0].set(title="router accuracy by noise level", xlabel="t (1 = pure noise)",
                ylabel="accuracy", ylim=(0, 1.05))
    strategies = report["strategies"]
    names = list(strategies)
    strategy_bars(axes[1], report, "heldout_loss", ".4f")
    low = min(strategies[n]["heldout_loss"] for n in names)
    axes[1].set(title="held-out flow-matching loss", ylim=(low * 0.9, None))
    axes[2].bar(names, [strategies[n]["expert_calls_per_sample"] for n in names],
                color="tab:green")
    axes[2].set(title="expert forward passes per sample")
    if grid:
        axes[3].imshow(Image.open(io.BytesIO(grid)), cmap="gray")
        axes[3].set_axis_off()
        axes[3].set(title=f"samples ({next(iter(strategies))})")
    return figure_png(figure)
