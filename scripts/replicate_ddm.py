"""Replicate DDM's headline at small scale: a monolith against K = 4 (8) clustered flow-matching
experts and K = 4 experts on random partitions, at equal training FLOPs, on 5,000 MNIST digits.

Every run uses the same seed, held-out rows and U-Net. Each expert trains total_steps / K
steps at the same batch; the monolith trains total_steps steps plus as many as the K = 4
router's training FLOPs buy, so every row of the table costs the same FLOPs, router included.
Each run is scored by the eval stage's held-out flow-matching loss and by a Fréchet distance
(FD) between generated and held-out digits, in the feature space of a small digit classifier
trained here on the training split. Same noise for every model and strategy.

    python scripts/replicate_ddm.py --ks 4 8 --total-steps 4800 --samples 1000 --out ddm.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from orchestrator.ensemble import Routing
from orchestrator.evaluate.frechet import (
    DigitClassifier,
    bootstrap_sd,
    embed,
    frechet_distance,
    labelled_images,
    predict,
    train_classifier,
)
from orchestrator.modalities.image.evaluation import flow_losses, heldout_subset
from orchestrator.modalities.image.sampling import load_ensemble, sample, velocity
from orchestrator.pipeline import run_pipeline
from orchestrator.state.config import parse_config
from orchestrator.state.manifest import Manifest
from runstore import storage
from worker.flow import to_model_space, to_pixels

RANDOM_K = 4  # the random-partition ablation and the FLOP budget are both set at K = 4
STRATEGIES = ("top1", "topk", "full")


@dataclass
class Run:
    name: str
    clusters: int  # 1: the monolith
    method: str  # kmeans, random, or none for the monolith
    steps: int  # per expert
    manifest: Manifest | None = None
    report: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # per held-out row
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def flops(self) -> float:
        spent = self.report["train_flops"]
        return spent["experts"] + spent["router"]

    @property
    def partition(self) -> str:
        return "all data" if self.clusters == 1 else self.method


def run_config(run: Run, storage_url: str, args: argparse.Namespace) -> dict[str, Any]:
    monolith = run.clusters == 1
    return {
        "run": run.name, "storage": storage_url, "seed": args.seed,
        "data": {"source": "builtin:mnist5k"},
        "partition": {"clusters": max(run.clusters, 1),
                      "method": "kmeans" if monolith else run.method},
        "experts": {"monolith": monolith, "steps": run.steps, "batch_size": args.batch_size,
                    "warmup_steps": min(100, run.steps),  # the figures in the README
                    "checkpoint_every": max(run.steps // 2, 1),
                    "threads": args.monolith_threads if monolith else args.threads},
        "router": {"channels": args.router_channels, "steps": args.router_steps,
                   "batch_size": args.router_batch},
        "islands": {"local": 1 if monolith else args.islands},
        "tracking": {"wandb": "disabled"},
        "inference": {"sample_steps": args.sample_steps, "top_k": 2},
    }


def train(run: Run, storage_url: str, args: argparse.Namespace, console: Console) -> None:
    console.rule(f"{run.name}: K = {run.clusters}, {run.partition}, {run.steps} steps "
                 f"x batch {args.batch_size} per expert")
    started = time.perf_counter()
    run.manifest = run_pipeline(parse_config(run_config(run, storage_url, args)), console)
    run.wall_seconds = time.perf_counter() - started
    run.report = storage.read_json(storage.join(run.manifest.layout.eval, "report.json"))


def monolith_steps(reference: Run, batch: int) -> int:
    """Steps at `batch` that cost what the reference run's experts and router cost together.
    The monolith is the experts' architecture, so it costs their FLOPs per sample."""
    experts = reference.report["experts"]
    per_sample = sum(row["train_flops"] for row in experts) / (
        sum(row["steps"] for row in experts) * batch)
    return round(reference.flops / (per_sample * batch))


def as_stored(x: torch.Tensor) -> torch.Tensor:
    """Generated images rounded to pixels, as a stored image (and every real one) would be."""
    return to_model_space(to_pixels(x))


@torch.no_grad()
def score(run: Run, classifier: DigitClassifier, real: np.ndarray, noise: torch.Tensor,
          args: argparse.Namespace, console: Console) -> None:
    """Per-row held-out losses (for paired noise estimates) and FD of N samples per strategy."""
    assert run.manifest is not None
    ensemble, _ = load_ensemble(run.manifest)
    heldout = heldout_subset(run.manifest, ensemble.clusters, run.report["heldout_rows"],
                             args.seed)
    classes = classifier.head[-1].out_features
    for strategy in sorted(run.report["strategies"], key=STRATEGIES.index):
        row = run.report["strategies"][strategy]
        routing = Routing(strategy, 2)
        losses = flow_losses(lambda x, t, r=routing: velocity(ensemble, x, t, r), heldout,
                             args.seed)
        # The eval stage's number, recomputed row by row: they must agree.
        assert math.isclose(losses.mean().item(), row["heldout_loss"], rel_tol=1e-4)
        run.losses[strategy] = losses
        ensemble.expert_rows = 0
        started = time.perf_counter()
        samples = torch.cat([sample(ensemble, part, args.sample_steps, routing)
                             for part in noise.split(1000)])
        seconds = time.perf_counter() - started
        features = embed(classifier, samples)
        run.scores[strategy] = {
            "heldout_loss": row["heldout_loss"],
            "fd": frechet_distance(features, real),
            "fd_sd": bootstrap_sd(features, real, seed=args.seed),
            "sample_seconds": seconds,
            "expert_calls_per_sample": ensemble.expert_rows / len(noise),
            "digit_histogram": np.bincount(predict(classifier, as_stored(samples)).numpy(),
                                           minlength=classes).tolist(),
        }
        console.print(f"{run.name} {strategy}: held-out loss {row['heldout_loss']:.4f}, "
                      f"FD {run.scores[strategy]['fd']:.2f} "
                      f"(+- {run.scores[strategy]['fd_sd']:.2f}), sampling {seconds:.0f} s")


def judge(difference: float, noise: float) -> str:
    """Lower is better; a difference within two standard errors is called a tie."""
    if abs(difference) <= 2 * noise:
        return "no clear difference"
    return "better" if difference < 0 else "worse"


def compare(ours: Run, theirs: Run, ours_strategy: str, theirs_strategy: str) -> dict[str, Any]:
    """Loss: paired over the same held-out rows and noise draws. FD: both bootstrap spreads."""
    diff = ours.losses[ours_strategy] - theirs.losses[theirs_strategy]
    loss_se = diff.std().item() / math.sqrt(len(diff))
    a, b = ours.scores[ours_strategy], theirs.scores[theirs_strategy]
    fd_se = math.hypot(a["fd_sd"], b["fd_sd"])
    return {
        "loss": (a["heldout_loss"], b["heldout_loss"], diff.mean().item(), loss_se),
        "fd": (a["fd"], b["fd"], a["fd"] - b["fd"], fd_se),
        "loss_verdict": judge(diff.mean().item(), loss_se),
        "fd_verdict": judge(a["fd"] - b["fd"], fd_se),
    }


def verdict_line(title: str, result: dict[str, Any]) -> str:
    parts = []
    for metric, digits in (("loss", 4), ("fd", 2)):
        mine, other, diff, se = result[metric]
        name = "held-out loss" if metric == "loss" else "FD"
        parts.append(f"{name} {mine:.{digits}f} vs {other:.{digits}f} "
                     f"({100 * diff / other:+.1f}%, s.e. {se:.2g}): "
                     f"{result[f'{metric}_verdict']}")
    wins = [result["loss_verdict"] == "better", result["fd_verdict"] == "better"]
    answer = "yes" if all(wins) else "partly" if any(wins) else "no"
    return f"{title}? {answer}. " + "; ".join(parts)


def results_table(runs: list[Run], monolith: Run, floor: float, args: argparse.Namespace,
                  accuracy: float) -> Table:
    table = Table(title=f"DDM on mnist5k at equal training FLOPs (router included): "
                        f"{args.total_steps} x {args.batch_size} samples, "
                        f"{args.samples} samples x {args.sample_steps} Euler steps for FD")
    for column in ("run", "strategy", "K", "partition", "train FLOPs", "FLOPs/mono",
                   "held-out loss", "FD", "loss vs mono", "FD vs mono"):
        table.add_column(column, justify="left" if column in ("run", "strategy",
                                                               "partition") else "right")
    base = monolith.scores["full"]
    for run in runs:
        for strategy, row in run.scores.items():
            table.add_row(
                run.name, strategy if run.clusters > 1 else "-", str(run.clusters),
                run.partition, f"{run.flops:.4g}", f"{run.flops / monolith.flops:.4f}",
                f"{row['heldout_loss']:.4f}", f"{row['fd']:.2f} +- {row['fd_sd']:.2f}",
                f"{100 * (row['heldout_loss'] / base['heldout_loss'] - 1):+.1f}%",
                f"{100 * (row['fd'] / base['fd'] - 1):+.1f}%")
    table.add_row("real digits", "-", "-", "held-out vs train", "-", "-", "-",
                  f"{floor:.2f}", "-", "-")
    table.caption = (f"lower is better; FD in the embedding of a digit classifier (held-out "
                     f"accuracy {accuracy:.3f}) against the held-out digits, +- its bootstrap "
                     "s.d.; the last row is the floor two real sets reach")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[4],
                        help="Expert counts of the clustered runs (4 is the FLOP reference).")
    parser.add_argument("--total-steps", type=int, default=4800,
                        help="Steps of all experts together (each gets total / K).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--router-steps", type=int, default=400)
    parser.add_argument("--router-batch", type=int, default=64)
    parser.add_argument("--router-channels", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1000, help="Generated digits per FD.")
    parser.add_argument("--sample-steps", type=int, default=25, help="Euler steps per sample.")
    parser.add_argument("--classifier-epochs", type=int, default=8)
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads of each expert's worker.")
    parser.add_argument("--monolith-threads", type=int, default=None,
                        help="Torch threads of the monolith's worker and of the FD work here "
                             "(default: islands x threads, the machine the experts share; 1 "
                             "on a machine busy with other work, where threads wait on each "
                             "other).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default=None, help="Where runs go (default: a temp dir).")
    parser.add_argument("--out", default="ddm.json")
    args = parser.parse_args()
    args.monolith_threads = args.monolith_threads or args.islands * args.threads
    if min(args.ks) < 2:
        parser.error("--ks: expert counts of at least 2 (the monolith always runs)")

    console = Console()
    if not console.is_terminal:  # a log file: room for the whole table on one line per row
        console = Console(width=140)
    started = time.perf_counter()
    storage_url = args.storage or f"file://{tempfile.mkdtemp(prefix='ddm-')}"
    ks = sorted(set(args.ks), key=lambda k: (k != RANDOM_K, k))
    runs = [Run(f"ddm-k{k}", k, "kmeans", args.total_steps // k) for k in ks]
    runs.append(Run(f"ddm-random-k{RANDOM_K}", RANDOM_K, "random",
                    args.total_steps // RANDOM_K))
    for run in runs:
        train(run, storage_url, args, console)
    # Both K = 4 runs cost the same by construction; the clustered one when there is one.
    reference = next(run for run in runs if run.clusters == RANDOM_K)
    steps = monolith_steps(reference, args.batch_size)
    console.print(f"monolith: {steps} steps = {args.total_steps} + {steps - args.total_steps} "
                  f"for the FLOPs of {reference.name}'s router")
    monolith = Run("ddm-monolith", 1, "none", steps)
    train(monolith, storage_url, args, console)
    runs.insert(0, monolith)

    torch.set_num_threads(args.monolith_threads)
    with console.status("training the digit classifier for FD"):
        layout = monolith.manifest.layout
        x_train, y_train = labelled_images(layout, 1, "train")
        x_held, y_held = labelled_images(layout, 1, "heldout")
        clock = time.perf_counter()
        classifier = train_classifier(x_train, y_train, args.seed, args.classifier_epochs)
        accuracy = (predict(classifier, x_held) == y_held).float().mean().item()
    console.print(f"digit classifier: held-out accuracy {accuracy:.3f} on {len(x_held)} digits "
                  f"(trained on {len(x_train)} in {time.perf_counter() - clock:.0f} s)")
    real, real_train = embed(classifier, x_held), embed(classifier, x_train)
    floor = frechet_distance(real, real_train)
    noise = torch.randn((args.samples, *x_held.shape[1:]),
                        generator=torch.Generator().manual_seed(args.seed + 11))
    for run in runs:
        score(run, classifier, real, noise, args, console)

    console.print(results_table(runs, monolith, floor, args, accuracy))
    verdicts = []
    for run in runs:
        if run.method == "kmeans":
            verdicts.append(verdict_line(
                f"top-1 with K = {run.clusters} clustered experts beats the monolith FLOP for "
                f"FLOP ({run.flops / monolith.flops:.3f}x its FLOPs)",
                compare(run, monolith, "top1", "full")))
    clustered = next((run for run in runs if run.clusters == RANDOM_K
                      and run.method == "kmeans"), None)
    random_run = runs[-1]
    if clustered is not None:
        for strategy in clustered.scores:
            verdicts.append(verdict_line(
                f"clustered beat random partitions (K = {RANDOM_K}, {strategy})",
                compare(clustered, random_run, strategy, strategy)))
    for line in verdicts:
        console.print(line)
    if accuracy < 0.95:
        console.print(f"[yellow]the FD classifier's held-out accuracy is only {accuracy:.3f}: "
                      "FD differences are less meaningful[/]")

    wall = time.perf_counter() - started
    Path(args.out).write_text(json.dumps({
        "args": vars(args), "storage": storage_url, "wall_seconds": wall,
        "classifier": {"heldout_accuracy": accuracy, "train_rows": len(x_train),
                       "heldout_rows": len(x_held), "epochs": args.classifier_epochs},
        "fd_real_heldout_vs_train": floor,
        "runs": [{
            "run": run.name, "clusters": run.clusters, "partition": run.partition,
            "steps_per_expert": run.steps, "batch_size": args.batch_size,
            "train_flops": {**run.report["train_flops"], "total": run.flops,
                            "vs_monolith": run.flops / monolith.flops},
            "cluster_sizes": run.manifest.stage("partition")["stats"]["sizes"],
            "router_accuracy": run.manifest.stage("router").get("heldout_accuracy"),
            "wall_seconds": run.wall_seconds, "strategies": run.scores,
        } for run in runs if run.manifest is not None],
        "verdicts": verdicts,
    }, indent=2))
    console.print(f"wrote {args.out}; runs in {storage_url}; {wall / 60:.1f} min in all")


if __name__ == "__main__":
    main()
