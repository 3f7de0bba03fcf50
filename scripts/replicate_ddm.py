"""Replicate DDM's comparison under the paper's training protocol (arXiv 2501.05450, 4.1).

Every arm takes the same number S of optimizer steps as the monolith; only the batch is
split: the monolith's batch B becomes K experts x B/K. One architecture, one constant
learning rate (after a short linear warm-up) and one seed for every arm. The router's
training FLOPs are counted, and every single-model arm gets them as extra steps. Arms:

  monolith     1 model, S (+ router) steps at batch B
  kmeans       K experts on k-means clusters, S steps at B/K each
  random       K experts on a random partition, S steps at B/K each
  small-batch  1 model at batch B/K for K x S (+ router) steps: the batch-size control
  wide         1 model whose channel width costs ~K x the FLOPs per sample (the width
               nearest K x, among multiples of 4), S (+ router) steps at B/K: the
               capacity control at the ensemble's training FLOPs
  btm          Branch-Train-Merge: a seed monolith at B for S/4 steps, then K experts
               branched from it on the k-means clusters for 3S/4 steps at B/K

Each arm's one run keeps snapshots at S/16, S/8, S/4, S/2 and S (`experts.snapshot_at`),
EMA and raw weights. Every snapshot is scored on the same fixed (x0, t, noise) triples from
the held-out split: flow-matching loss with top-1, full and oracle routing (oracle: each
image to its own cluster's expert, the cluster from the partition's assignment), broken
down by t; the train loss the trainer logged at that step; and at the final step a Fréchet
distance (with bootstrap intervals) between generated and held-out images, in the features
of a small classifier trained on the training split.

    python scripts/replicate_ddm.py                       # defaults: S = 512, B = 32, K = 4
                                                          # (78 min on 2 busy cores)
    python scripts/replicate_ddm.py --steps 256 --triples 500 --samples 300 --single-threads 1
    python scripts/replicate_ddm.py --quick               # the test's smoke run
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for scripts.*

from orchestrator.ensemble import Ensemble, Routing
from orchestrator.ensemble.snapshots import load_expert_at
from orchestrator.evaluate.frechet import (
    bootstrap_distances,
    embed,
    frechet_distance,
    labelled_images,
    predict,
    train_classifier,
)
from orchestrator.evaluate.pictures import subplots
from orchestrator.modalities.image.data import read_split
from orchestrator.modalities.image.sampling import (
    add_velocities,
    load_classifier_router,
    sample,
)
from orchestrator.state.manifest import Manifest
from runstore import storage
from scripts import replication_protocol as protocol
from scripts.replication_protocol import POINT_NAMES, ROUTINGS, WEIGHTS
from worker.flow import noisy
from worker.models import build_model
from worker.objectives import count_flops

ENSEMBLES = ("kmeans", "random", "btm")


@dataclass
class Arm:
    name: str
    title: str
    clusters: int  # experts; 1 for a single model
    method: str  # the partition: kmeans or random
    steps: int  # each expert's own steps (BTM: after the seed)
    batch: int
    channels: int
    seed_steps: int = 0
    seed_batch: int | None = None
    manifest: Manifest | None = None
    flops_per_sample: float = 0.0  # training (forward + backward)
    router_flops: float = 0.0
    wall_seconds: float = 0.0
    points: list[dict[str, Any]] = field(default_factory=list)
    losses: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    fd: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ensemble(self) -> bool:
        return self.clusters > 1


def arm_config(arm: Arm, storage_url: str, args: argparse.Namespace) -> dict[str, Any]:
    return protocol.run_config(
        arm, f"protocol-{arm.name}", storage_url, args, data={"source": args.data},
        model={"channels": arm.channels, "channel_mult": list(args.channel_mult),
               "patch": args.patch},
        threads=args.threads if arm.ensemble else args.single_threads,
        router={"channels": args.router_channels, "steps": args.router_steps,
                "batch_size": args.router_batch, "patch": args.router_patch})


def train(arm: Arm, storage_url: str, args: argparse.Namespace, console: Console) -> None:
    seed = (f"a seed at batch {arm.seed_batch} for {arm.seed_steps} steps, then "
            if arm.seed_steps else "")
    console.rule(f"{arm.name}: {arm.title}; {seed}{arm.clusters} x {arm.steps} steps at "
                 f"batch {arm.batch}, {arm.channels} channels")
    arm.manifest, arm.wall_seconds, arm.flops_per_sample = protocol.train_until_router(
        arm_config(arm, storage_url, args), console)
    arm.router_flops = (arm.manifest.stage("router").get("train_flops") or 0.0
                        if arm.ensemble else 0.0)


def unet_flops(channels: int, image_shape: list[int], args: argparse.Namespace) -> float:
    """Training FLOPs per sample (forward + backward, as the trainer counts them)."""
    model = build_model("unet", image_channels=image_shape[0], channels=channels,
                        channel_mult=list(args.channel_mult), patch=args.patch)
    return 3.0 * count_flops(model, torch.zeros(1, *image_shape), torch.zeros(1))


def wide_width(reference: Arm, image_shape: list[int], args: argparse.Namespace) -> int:
    """The multiple of 4 whose FLOPs per sample come nearest K x the reference's (in log
    ratio), searched upwards from the reference's width."""
    target = args.clusters * reference.flops_per_sample
    best, best_error = args.width, math.inf
    for width in range(args.width + 4, 4 * args.width * args.clusters + 1, 4):
        ratio = unet_flops(width, image_shape, args) / target
        if abs(math.log(ratio)) < best_error:
            best, best_error = width, abs(math.log(ratio))
        if ratio > 1:  # wider only costs more
            break
    return best


def plan_points(arm: Arm) -> None:
    """Each point's run step, FLOPs so far and where its weights are."""
    assert arm.manifest is not None
    seed_flops = arm.flops_per_sample * arm.seed_steps * (arm.seed_batch or 0)
    for point in protocol.snapshot_points(arm):
        step = point.snapshot_step
        if point.seeded:  # still the seed monolith
            flops = arm.flops_per_sample * (arm.seed_batch or 0) * step
        else:
            flops = (seed_flops + arm.flops_per_sample * arm.batch * step * arm.clusters
                     + arm.router_flops)
        arm.points.append({"point": point.name, "fraction": point.fraction,
                           "step": point.step, "snapshot_step": step,
                           "experts": point.experts, "flops": flops,
                           "train_loss": train_loss(arm.manifest, point.experts, step)})


def train_loss(manifest: Manifest, experts: list[int], step: int) -> float:
    """The trainer's last logged loss at or before `step` (the mean over its log window),
    averaged over the experts."""
    values = []
    for expert in experts:
        logged = {row["step"]: row["loss"] for row in protocol.logged_losses(manifest, expert)
                  if row["step"] <= step}
        values.append(logged[max(logged)] if logged else float("nan"))
    return float(np.mean(values))


@dataclass
class Triples:
    """Fixed (x0, t, noise) draws from the held-out split, the same for every model."""

    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    cluster: dict[str, torch.Tensor]  # each ensemble arm's partition's cluster of x0

    @property
    def x_t(self) -> torch.Tensor:
        return noisy(self.x0, self.t, self.noise)

    @property
    def target(self) -> torch.Tensor:
        return self.noise - self.x0


def draw_triples(arms: dict[str, Arm], count: int, seed: int) -> Triples:
    """`count` triples over the held-out rows (each row as often as the count needs), with
    every partition's cluster of each row; the held-out rows are the same in every run."""
    first = next(iter(arms.values()))
    assert first.manifest is not None
    reference = read_split(first.manifest.layout, first.clusters, "heldout")
    clusters: dict[str, torch.Tensor] = {}
    for name, arm in arms.items():
        assert arm.manifest is not None
        split = read_split(arm.manifest.layout, arm.clusters, "heldout")
        if not torch.equal(split.pixels, reference.pixels):
            raise RuntimeError(f"{name}: its held-out rows differ from {first.name}'s")
        clusters[name] = split.cluster
    generator = torch.Generator().manual_seed(seed + 101)
    rows = len(reference)
    index = torch.cat([torch.randperm(rows, generator=generator)
                       for _ in range(-(-count // rows))])[:count]
    x0 = reference.x0(index)
    t = torch.rand(count, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return Triples(x0, t, noise, {name: cluster[index] for name, cluster in clusters.items()})


@torch.no_grad()
def predictions(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x_t[i:i + batch], t[i:i + batch]) for i in range(0, len(t), batch)])


def per_triple(velocity: torch.Tensor, triples: Triples) -> torch.Tensor:
    return ((velocity - triples.target) ** 2).flatten(1).mean(1)


@torch.no_grad()
def score_point(arm: Arm, point: dict[str, Any], triples: Triples) -> dict[str, Any]:
    """Per-triple losses at one snapshot, EMA and raw: one model, or the ensemble with
    top-1, full and oracle routing (the experts' velocities computed once for all three)."""
    assert arm.manifest is not None
    x_t, t = triples.x_t, triples.t
    out: dict[str, dict[str, torch.Tensor]] = {}
    router = (load_classifier_router(arm.manifest, arm.clusters)
              if len(point["experts"]) > 1 else None)
    weights = router(x_t, t) if router else None
    for kind in WEIGHTS:
        velocities = torch.stack([
            predictions(load_expert_at(arm.manifest, k, point["snapshot_step"], kind), x_t, t)
            for k in point["experts"]])
        if weights is None:  # one model: every routing is the same
            loss = per_triple(velocities[0], triples)
            out[kind] = {routing: loss for routing in ROUTINGS}
            continue
        mix = weights.T.reshape(*weights.T.shape, *([1] * (velocities.dim() - 2)))
        full = (velocities * mix).sum(0)  # sum_k p(k | x_t, t) v_k, as strategy full
        rows = torch.arange(len(t))
        out[kind] = {"top1": per_triple(velocities[weights.argmax(1), rows], triples),
                     "full": per_triple(full, triples),
                     "oracle": per_triple(velocities[triples.cluster[arm.name], rows],
                                          triples)}
    return out


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean of a - b over the same triples, its standard error, and relative to b."""
    diff = (a - b).double()
    mean, base = diff.mean().item(), b.double().mean().item()
    se = diff.std().item() / math.sqrt(len(diff))
    return {"gap": mean, "se": se, "relative": mean / base, "relative_se": se / base}


def gap_rows(ours: Arm, theirs: Arm, kind: str, routing: str) -> list[dict[str, float]]:
    """The gap at each point (paired by point: the same fraction of each arm's budget),
    placed at our FLOPs."""
    return [{"flops": point["flops"], "their_flops": other["flops"],
             **paired(mine[kind][routing], their[kind]["top1"])}
            for point, other, mine, their in zip(ours.points, theirs.points, ours.losses,
                                                 theirs.losses, strict=True)]


def by_t(ours: Arm, theirs: Arm, kind: str, routing: str, triples: Triples,
         bins: int) -> list[dict[str, float]]:
    """The gap at the final point in equal-width bins of t."""
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(triples.t, edges[1:-1], right=True)
    a, b = ours.losses[-1][kind][routing], theirs.losses[-1][kind]["top1"]
    rows = []
    for index in range(bins):
        inside = which == index
        if inside.sum() < 2:
            continue
        rows.append({"t_low": edges[index].item(), "t_high": edges[index + 1].item(),
                     "triples": int(inside.sum()), **paired(a[inside], b[inside])})
    return rows


def crossing(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Where the gap is widest and whether it shrinks over the second half (S/2 to S: the
    first points are barely trained models, all close); where it first goes below zero
    (interpolated in log FLOPs; the first point's FLOPs when it starts below); and the first
    point where it is below zero by more than two standard errors."""
    first, half, last = rows[0], rows[-2], rows[-1]
    widest = max(range(len(rows)), key=lambda i: abs(rows[i]["relative"]))
    out: dict[str, Any] = {"shrinks": abs(last["relative"]) < abs(half["relative"]),
                           "widest_point": POINT_NAMES[widest],
                           "widest_relative": rows[widest]["relative"],
                           "below_zero_from_start": first["gap"] < 0,
                           "crosses_at_flops": first["flops"] if first["gap"] < 0 else None,
                           "significantly_ahead_from": next(
                               (r["flops"] for r in rows if r["gap"] < -2 * r["se"]), None)}
    for before, after in itertools.pairwise(rows):
        if out["crosses_at_flops"] is None and before["gap"] >= 0 > after["gap"]:
            out["crosses_at_flops"] = protocol.log_crossing(before, after, "flops")
    return out


def where_it_crosses(summary: dict[str, Any]) -> str:
    if summary["below_zero_from_start"]:
        crossed = "is below zero from the first point"
    elif summary["crosses_at_flops"]:
        crossed = f"crosses zero at about {summary['crosses_at_flops']:.3g} FLOPs"
    else:
        crossed = "stays above zero at every point"
    ahead = summary["significantly_ahead_from"]
    return crossed + (f", ahead by more than two s.e. from {ahead:.3g} FLOPs" if ahead
                      else ", never ahead by more than two s.e.")


def judge(row: dict[str, float]) -> str:
    if abs(row["gap"]) <= 2 * row["se"]:
        return "no clear difference"
    return "ahead" if row["gap"] < 0 else "behind"


def verdicts(arms: dict[str, Arm], gaps: dict[str, Any]) -> list[str]:
    lines = []
    for kind in WEIGHTS:
        main = gaps[kind]["kmeans_top1_vs_monolith"]
        rows, summary = main["rows"], main["summary"]
        tag = f"{kind.upper() if kind == 'ema' else kind}:"
        path = ", ".join(f"{100 * r['relative']:+.1f}% at {r['flops']:.3g}" for r in rows)
        lines.append(f"{tag} ensemble (k-means, top-1) minus monolith in held-out loss: "
                     f"{path} FLOPs; widest at {summary['widest_point']} "
                     f"({100 * summary['widest_relative']:+.1f}%), it "
                     f"{'shrinks' if summary['shrinks'] else 'does not shrink'} from S/2 to S "
                     f"and {where_it_crosses(summary)}; at S the ensemble is "
                     f"{judge(rows[-1])}.")
        oracle = gaps[kind]["kmeans_oracle_vs_monolith"]["summary"]
        if summary["significantly_ahead_from"]:
            lines.append(f"{tag} top-1 routing is ahead on its own: the router is not the "
                         "limit.")
        elif oracle["significantly_ahead_from"]:
            lines.append(f"{tag} only oracle routing is ahead (from "
                         f"{oracle['significantly_ahead_from']:.3g} FLOPs): the router is the "
                         "limit.")
        else:
            lines.append(f"{tag} not even oracle routing is ahead: the experts themselves are "
                         "behind, not only the router.")
        small = gaps[kind]["kmeans_top1_vs_small-batch"]["rows"][-1]
        mono_small = gaps[kind]["small-batch_vs_monolith"]["rows"][-1]
        if judge(rows[-1]) == "ahead" and judge(small) != "ahead":
            lines.append(f"{tag} the ensemble's lead over the monolith "
                         f"({100 * rows[-1]['relative']:+.1f}%) disappears against the "
                         f"small-batch monolith ({100 * small['relative']:+.1f}%): it came from "
                         "the batch size.")
        elif judge(rows[-1]) == "ahead":
            lines.append(f"{tag} the lead survives the batch-size control: "
                         f"{100 * small['relative']:+.1f}% against the small-batch monolith.")
        else:
            lines.append(f"{tag} no lead to explain; the small-batch monolith itself is "
                         f"{100 * mono_small['relative']:+.1f}% against the monolith "
                         f"({judge(mono_small)}), the ensemble "
                         f"{100 * small['relative']:+.1f}% against it.")
        for other, label in (("wide", "the wide monolith (capacity control)"),
                             ("random", "experts on a random partition"),
                             ("btm", "BTM experts (branched at S/4)")):
            row = gaps[kind][f"kmeans_top1_vs_{other}"]["rows"][-1]
            lines.append(f"{tag} k-means top-1 against {label} at S: "
                         f"{100 * row['relative']:+.1f}% ({judge(row)}).")
    return lines


@torch.no_grad()
def frechet_scores(arm: Arm, classifier: torch.nn.Module, real: np.ndarray,
                   noise: torch.Tensor, args: argparse.Namespace) -> None:
    """FD of the final models' samples (top-1 for an ensemble), EMA and raw, with a 95%
    interval from the bootstrap's standard deviation."""
    assert arm.manifest is not None
    router = load_classifier_router(arm.manifest, arm.clusters) if arm.ensemble else None
    routing = Routing("top1" if arm.ensemble else "full", 1)
    for kind in WEIGHTS:
        experts = [load_expert_at(arm.manifest, k, None, kind) for k in range(arm.clusters)]
        ensemble = Ensemble(experts, router, add_velocities)
        samples = torch.cat([sample(ensemble, part, args.sample_steps, routing)
                             for part in noise.split(500)])
        features = embed(classifier, samples)
        # Resampling with replacement biases the distance upwards (repeated rows), so the
        # interval is the distance +- 1.96 bootstrap s.d., not the bootstrap's percentiles.
        sd = float(np.std(bootstrap_distances(features, real, args.bootstrap, args.seed),
                          ddof=1))
        fd = frechet_distance(features, real)
        arm.fd[kind] = {"fd": fd, "sd": sd, "low": fd - 1.96 * sd, "high": fd + 1.96 * sd}


def loss_table(arms: dict[str, Arm], triples: int) -> Table:
    table = Table(title=f"held-out flow-matching loss on {triples} fixed (x0, t, noise) "
                        "triples, at each snapshot")
    for column in ("arm", "point", "step", "train FLOPs", "train loss",
                   *(f"{kind} {routing}" for kind in WEIGHTS for routing in ROUTINGS)):
        table.add_column(column, justify="left" if column in ("arm", "point") else "right")
    for arm in arms.values():
        for point, losses in zip(arm.points, arm.losses, strict=True):
            cells = []
            for kind in WEIGHTS:
                for routing in ROUTINGS:
                    single = len(point["experts"]) == 1
                    cells.append("-" if single and routing != "top1"
                                 else f"{losses[kind][routing].mean().item():.4f}")
            table.add_row(arm.name, point["point"], str(point["step"]),
                          f"{point['flops']:.3g}", f"{point['train_loss']:.4f}", *cells)
    table.caption = ("single models in the top1 columns; BTM before S/4 is its seed monolith; "
                     "FLOPs include the router's (every router's, from the first point on)")
    return table


def comparison_table(gaps: dict[str, Any]) -> Table:
    names = [name for name in gaps["raw"] if "_vs_" in name and "by_t" not in name]
    return protocol.gap_table(
        "ensemble minus baseline in held-out loss, paired over the triples "
        "(negative: the ensemble is ahead)",
        {f"{kind} {name.replace('_vs_', ' vs ')}": gaps[kind][name]["rows"]
         for kind in WEIGHTS for name in names},
        "+- two standard errors, in % of the baseline's loss")


def fd_table(arms: dict[str, Arm], floor: float, accuracy: float, args: argparse.Namespace
             ) -> Table:
    table = Table(title=f"Fréchet distance at S: {args.samples} samples x {args.sample_steps} "
                        "Euler steps (ensembles top-1) against the held-out images")
    for column in ("arm", "EMA", "raw"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for arm in arms.values():
        table.add_row(arm.name, *(f"{arm.fd[k]['fd']:.2f} [{arm.fd[k]['low']:.2f}, "
                                  f"{arm.fd[k]['high']:.2f}]" for k in WEIGHTS))
    table.caption = (f"[FD +- 1.96 bootstrap s.d.]; classifier held-out accuracy {accuracy:.3f}; "
                     f"two real sets (held-out vs train) are {floor:.2f} apart")
    return table


def plots(arms: dict[str, Arm], gaps: dict[str, Any], out: Path) -> list[str]:
    """Held-out loss vs FLOPs per arm; the main gap vs FLOPs with its band; the gap by t."""
    written = []
    figure, axes = subplots(2, (12, 4.5))
    for axis, kind in zip(axes, WEIGHTS, strict=True):
        for arm in arms.values():
            axis.plot([p["flops"] for p in arm.points],
                      [losses[kind]["top1"].mean().item() for losses in arm.losses],
                      marker="o", label=arm.name)
        axis.set(xscale="log", xlabel="training FLOPs (router included)",
                 ylabel="held-out loss (ensembles top-1)", title=f"{kind} weights")
        axis.legend()
    written.append(protocol.save_png(figure, out, "loss"))
    figure, axes = subplots(2, (12, 4.5))
    for axis, kind in zip(axes, WEIGHTS, strict=True):
        for name, color in (("kmeans_top1_vs_monolith", "tab:blue"),
                            ("kmeans_oracle_vs_monolith", "tab:green"),
                            ("kmeans_top1_vs_small-batch", "tab:orange")):
            protocol.plot_gap(axis, gaps[kind][name]["rows"], color, name.replace("_vs_", " vs "))
        axis.axhline(0, color="grey", linestyle="--")
        axis.set(xscale="log", xlabel="training FLOPs", ylabel="loss gap (+- 2 s.e.)",
                 title=f"ensemble minus baseline, {kind} weights")
        axis.legend()
    written.append(protocol.save_png(figure, out, "gap"))
    figure, axes = subplots(2, (12, 4.5))
    for axis, kind in zip(axes, WEIGHTS, strict=True):
        for name, color in (("top1", "tab:blue"), ("oracle", "tab:green")):
            rows = gaps[kind][f"by_t_{name}"]
            x = [(r["t_low"] + r["t_high"]) / 2 for r in rows]
            y = np.array([r["gap"] for r in rows])
            band = 2 * np.array([r["se"] for r in rows])
            axis.errorbar(x, y, yerr=band, marker="o", color=color, capsize=3,
                          label=f"k-means {name} vs monolith")
        axis.axhline(0, color="grey", linestyle="--")
        axis.set(xlabel="t (1 = pure noise)", ylabel="loss gap at S (+- 2 s.e.)",
                 title=f"gap by noise level, {kind} weights")
        axis.legend()
    written.append(protocol.save_png(figure, out, "gap-by-t"))
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="builtin:mnist5k",
                        help="The data source, by name (e.g. builtin:fashion-mnist where the "
                             "code base has it).")
    parser.add_argument("--steps", type=int, default=512,
                        help="S: every arm's steps (a multiple of 16).")
    parser.add_argument("--batch", type=int, default=32, help="B: the monolith's batch.")
    parser.add_argument("--clusters", type=int, default=4, help="K: experts per ensemble.")
    parser.add_argument("--width", type=int, default=32, help="U-Net channels of every arm "
                        "but the wide monolith.")
    parser.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 2])
    parser.add_argument("--patch", type=int, default=2)
    protocol.add_schedule_arguments(parser)
    parser.add_argument("--triples", type=int, default=1000,
                        help="Fixed (x0, t, noise) triples the losses are measured on.")
    parser.add_argument("--t-bins", type=int, default=5)
    parser.add_argument("--samples", type=int, default=500, help="Generated images per FD.")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--bootstrap", type=int, default=100, help="Resamplings per FD.")
    parser.add_argument("--classifier-epochs", type=int, default=8)
    parser.add_argument("--router-steps", type=int, default=400)
    parser.add_argument("--router-batch", type=int, default=64)
    parser.add_argument("--router-channels", type=int, default=16)
    parser.add_argument("--router-patch", type=int, default=2)
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads of each expert's worker.")
    parser.add_argument("--single-threads", type=int, default=None,
                        help="Torch threads of a single model's worker and of the scoring "
                             "(default: islands x threads, the cores the experts share; 1 on "
                             "a machine busy with other work, where threads wait on each "
                             "other).")
    protocol.add_run_arguments(parser, "ddm-protocol.json", "<stem>-loss.png, ...",
                               "A smoke run on the 8x8 digits: S = 16, B = 8, K = 2, width 8.")
    args = parser.parse_args(argv)
    if args.quick:
        args.data, args.steps, args.batch, args.clusters, args.width = (
            "builtin:digits", 16, 8, 2, 8)
        args.channel_mult, args.patch, args.triples, args.samples = [1, 2], 1, 64, 32
        args.sample_steps, args.bootstrap, args.classifier_epochs = 2, 5, 1
        args.single_threads = 1
        args.router_steps, args.router_batch, args.router_channels, args.router_patch = (
            4, 16, 4, 1)
    protocol.check_steps(parser, args)
    if args.clusters < 2 or args.batch % args.clusters:
        parser.error("--clusters: at least 2, dividing --batch (each expert's batch is B/K)")
    args.single_threads = args.single_threads or args.islands * args.threads
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    console = protocol.wide_console(180)
    started = time.perf_counter()
    storage_url = protocol.storage_for(args, "ddm-protocol-")
    S, B, K, W = args.steps, args.batch, args.clusters, args.width
    arms: dict[str, Arm] = {
        "kmeans": Arm("kmeans", "experts on k-means clusters", K, "kmeans", S, B // K, W),
        "random": Arm("random", "experts on a random partition", K, "random", S, B // K, W),
        "btm": Arm("btm", "Branch-Train-Merge", K, "kmeans", S - S // 4, B // K, W,
                   seed_steps=S // 4, seed_batch=B),
    }
    with protocol.one_ray(arm_config(arms["kmeans"], storage_url, args)):
        for arm in arms.values():
            train(arm, storage_url, args, console)
        kmeans = arms["kmeans"]
        assert kmeans.manifest is not None
        router = kmeans.router_flops
        image_shape = storage.read_json(storage.join(kmeans.manifest.layout.final(0),
                                                     "meta.json"))["image_shape"]
        wide = wide_width(kmeans, image_shape, args)

        def paid(steps: int, batch: int, channels: int) -> int:
            """Steps plus as many as the router's training FLOPs buy at this batch."""
            return steps + round(router / (unet_flops(channels, image_shape, args) * batch))

        singles = {
            "monolith": Arm("monolith", "one model at the full batch", 1, "kmeans",
                            paid(S, B, W), B, W),
            "small-batch": Arm("small-batch", "one model at the experts' batch for K x S "
                               "steps", 1, "kmeans", paid(K * S, B // K, W), B // K, W),
            "wide": Arm("wide", f"one model {wide} channels wide at the experts' batch", 1,
                        "kmeans", paid(S, B // K, wide), B // K, wide),
        }
        for arm in singles.values():
            train(arm, storage_url, args, console)
    arms = {name: (singles | arms)[name] for name in
            ("monolith", "kmeans", "random", "small-batch", "wide", "btm")}

    torch.set_num_threads(args.single_threads)
    for arm in arms.values():
        plan_points(arm)
    triples = draw_triples({name: arms[name] for name in ENSEMBLES}, args.triples, args.seed)
    seconds = {"training": time.perf_counter() - started}
    clock = time.perf_counter()
    with console.status("scoring every snapshot"):
        for arm in arms.values():
            arm.losses = [score_point(arm, point, triples) for point in arm.points]
    seconds["scoring"] = time.perf_counter() - clock

    gaps: dict[str, Any] = {}
    for kind in WEIGHTS:
        comparisons = {"kmeans_top1_vs_monolith": ("kmeans", "top1", "monolith"),
                       "kmeans_full_vs_monolith": ("kmeans", "full", "monolith"),
                       "kmeans_oracle_vs_monolith": ("kmeans", "oracle", "monolith"),
                       "kmeans_top1_vs_small-batch": ("kmeans", "top1", "small-batch"),
                       "kmeans_top1_vs_wide": ("kmeans", "top1", "wide"),
                       "kmeans_top1_vs_random": ("kmeans", "top1", "random"),
                       "kmeans_top1_vs_btm": ("kmeans", "top1", "btm"),
                       "small-batch_vs_monolith": ("small-batch", "top1", "monolith")}
        gaps[kind] = {}
        for name, (ours, routing, theirs) in comparisons.items():
            rows = gap_rows(arms[ours], arms[theirs], kind, routing)
            gaps[kind][name] = {"rows": rows, "summary": crossing(rows)}
        for routing in ("top1", "oracle"):
            gaps[kind][f"by_t_{routing}"] = by_t(arms["kmeans"], arms["monolith"], kind,
                                                 routing, triples, args.t_bins)

    monolith = arms["monolith"]
    assert monolith.manifest is not None
    clock = time.perf_counter()
    with console.status("training the classifier for FD"):
        x_train, y_train = labelled_images(monolith.manifest.layout, 1, "train")
        x_held, y_held = labelled_images(monolith.manifest.layout, 1, "heldout")
        classifier = train_classifier(x_train, y_train, args.seed, args.classifier_epochs)
        accuracy = (predict(classifier, x_held) == y_held).float().mean().item()
    real = embed(classifier, x_held)
    floor = frechet_distance(real, embed(classifier, x_train))
    noise = torch.randn((args.samples, *x_held.shape[1:]),
                        generator=torch.Generator().manual_seed(args.seed + 11))
    seconds["classifier"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with console.status("sampling for FD"):
        for arm in arms.values():
            frechet_scores(arm, classifier, real, noise, args)
    seconds["frechet"] = time.perf_counter() - clock

    console.print(loss_table(arms, args.triples))
    console.print(comparison_table(gaps))
    console.print(fd_table(arms, floor, accuracy, args))
    lines = verdicts(arms, gaps)
    for line in lines:
        console.print(line, highlight=False)
    out = Path(args.out)
    pictures = plots(arms, gaps, out)
    wall = time.perf_counter() - started
    report = {
        "args": vars(args), "storage": storage_url, "wall_seconds": wall, "seconds": seconds,
        "points": list(POINT_NAMES), "router_flops": router, "wide_channels": wide,
        "classifier": {"heldout_accuracy": accuracy, "epochs": args.classifier_epochs},
        "fd_real_heldout_vs_train": floor,
        "arms": {name: {
            "title": arm.title, "experts": arm.clusters, "partition": arm.method,
            "steps": arm.steps, "batch": arm.batch, "channels": arm.channels,
            "seed_steps": arm.seed_steps, "seed_batch": arm.seed_batch,
            "flops_per_sample": arm.flops_per_sample, "router_flops": arm.router_flops,
            "wall_seconds": arm.wall_seconds,
            "points": [{**{k: v for k, v in point.items() if k != "experts"},
                        "heldout": {kind: {routing: losses[kind][routing].mean().item()
                                           for routing in ROUTINGS} for kind in WEIGHTS}}
                       for point, losses in zip(arm.points, arm.losses, strict=True)],
            "fd": arm.fd,
        } for name, arm in arms.items()},
        "gaps": gaps, "verdicts": lines, "plots": pictures,
    }
    protocol.write_report(out, report, pictures, storage_url, wall, console)
    return report


if __name__ == "__main__":
    main()
