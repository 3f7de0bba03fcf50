"""Replicate c-BTM's comparison under the papers' training protocol (c-BTM, arXiv 2303.14177;
BTM, arXiv 2208.03306), on multilingual text.

Compute is matched the papers' way: every arm takes the same number S of optimizer steps
and only the batch is split, the dense model's batch B becoming K experts x B/K, each
expert the dense model's size. One architecture, one constant learning rate (after a short
linear warm-up), one seed and the same held-out texts for every arm. For each K in --ks:

  dense        1 model at batch B for S steps (shared by every K)
  kmeans       K experts on the k-means clusters of the partition's features (tf-idf of
               word and character n-grams for text), S steps at B/K each; routed by the
               centroid router (softmax(-|e - c_k|^2 / T) of the text's prefix)
  random       K experts on a random partition, S steps at B/K each
  btm          Branch-Train-Merge: a seed model at B for S/4 steps on all data, then K
               experts branched from it on the k-means clusters for 3S/4 steps at B/K
  dense-small  1 model at batch B/K for K x S steps: the batch-size control

Each run keeps snapshots at S/16, S/8, S/4, S/2 and S (`experts.snapshot_at`, EMA and raw
weights), so every arm yields its whole curve, and every point of every arm has cost the
same training FLOPs as the same point of the others. Each snapshot is scored on the same
held-out texts, each routed on its first --prefix-bytes bytes and scored on the rest: bits
per byte with top-1, full (the mixture c-BTM uses) and oracle routing (each text to its
own cluster's expert), EMA and raw weights; the train loss the trainer logged at that
step; and bits per byte per language when the data has a `language` column.

    python scripts/replicate_cbtm.py                     # defaults: 26 min on 2 busy cores
    python scripts/replicate_cbtm.py --steps 256 --ks 2  # a reduced run: about 12 min
    python scripts/replicate_cbtm.py --quick             # a smoke run: under a minute
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
from orchestrator.evaluate.pictures import subplots
from orchestrator.modalities.text import DEFAULT_FEATURES
from orchestrator.modalities.text.evaluation import ScoredTexts, negative_log_likelihood
from orchestrator.modalities.text.generation import mix_log_probs
from orchestrator.modalities.text.router import CentroidRouter
from orchestrator.state.manifest import Manifest
from runstore.split_sample import choose_rows, read_chosen, schema_of, split_urls
from scripts import replication_protocol as protocol
from scripts.replication_protocol import POINT_NAMES, POINTS, ROUTINGS, WEIGHTS
from worker.models.byte_lm import EOS, PAD, encode

KINDS = ("kmeans", "random", "btm", "dense-small")  # the arms of each K
# (ours, our routing, theirs): ours minus theirs at each point; theirs is a single model.
COMPARISONS = (("kmeans", "full", "dense"), ("kmeans", "top1", "dense"),
               ("kmeans", "oracle", "dense"), ("kmeans", "full", "dense-small"),
               ("btm", "full", "dense"), ("random", "full", "dense"),
               ("dense-small", "full", "dense"))
LN2 = math.log(2)


@dataclass
class Arm:
    name: str
    kind: str  # dense, kmeans, random, btm or dense-small
    k: int  # the K the arm belongs to (1: the dense model every K shares)
    clusters: int  # experts; 1 for a single model
    method: str  # the partition: kmeans or random
    steps: int  # each expert's own steps (BTM: after the seed)
    batch: int
    seed_steps: int = 0
    seed_batch: int | None = None
    manifest: Manifest | None = None
    flops_per_sample: float = 0.0  # training (forward + backward), one window of context
    wall_seconds: float = 0.0
    router_accuracy: float | None = None  # share of held-out prefixes routed to their cluster
    points: list[dict[str, Any]] = field(default_factory=list)
    # Per point, per weights kind, per routing: each held-out text's NLL in nats [N].
    nll: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)

    @property
    def ensemble(self) -> bool:
        return self.clusters > 1


def build_arms(args: argparse.Namespace) -> dict[str, Arm]:
    S, B = args.steps, args.batch
    arms = {"dense": Arm("dense", "dense", 1, 1, "kmeans", S, B)}
    for K in args.ks:
        arms[f"kmeans-k{K}"] = Arm(f"kmeans-k{K}", "kmeans", K, K, "kmeans", S, B // K)
        arms[f"random-k{K}"] = Arm(f"random-k{K}", "random", K, K, "random", S, B // K)
        arms[f"btm-k{K}"] = Arm(f"btm-k{K}", "btm", K, K, "kmeans", S - S // 4, B // K,
                                seed_steps=S // 4, seed_batch=B)
        arms[f"dense-small-k{K}"] = Arm(f"dense-small-k{K}", "dense-small", K, 1, "kmeans",
                                        K * S, B // K)
    return arms


def arm_config(arm: Arm, storage_url: str, args: argparse.Namespace) -> dict[str, Any]:
    return protocol.run_config(
        arm, f"cbtm-{arm.name}", storage_url, args,
        data={"modality": "text", "source": args.data, "sample_rows": args.sample_rows},
        model={"context": args.context, "width": args.width, "depth": args.depth,
               "heads": args.heads},
        # A single model has the machine the experts share.
        threads=args.threads if arm.ensemble else args.islands * args.threads,
        router={"temperature": args.temperature}, eval={"prefix_bytes": args.prefix_bytes})


def train(arm: Arm, storage_url: str, args: argparse.Namespace, console: Console) -> None:
    seed = (f"a seed at batch {arm.seed_batch} for {arm.seed_steps} steps, then "
            if arm.seed_steps else "")
    console.rule(f"{arm.name}: {seed}{arm.clusters} x {arm.steps} steps at batch {arm.batch}")
    arm.manifest, arm.wall_seconds, arm.flops_per_sample = protocol.train_until_router(
        arm_config(arm, storage_url, args), console)


def plan_points(arm: Arm, context: int) -> None:
    """Each point's run step, samples and FLOPs so far, and which weights it reads."""
    assert arm.manifest is not None
    seed_samples = arm.seed_steps * (arm.seed_batch or 0)
    for point in protocol.snapshot_points(arm):
        step = point.snapshot_step
        if point.seeded:  # still the seed model
            samples = (arm.seed_batch or 0) * step
        else:
            samples = seed_samples + arm.batch * step * arm.clusters
        arm.points.append({"point": point.name, "fraction": point.fraction,
                           "step": point.step, "snapshot_step": step,
                           "experts": point.experts, "tokens": samples * context,
                           "flops": samples * arm.flops_per_sample,
                           "train_loss": train_loss(arm.manifest, point.experts, step)})


def train_loss(manifest: Manifest, experts: list[int], step: int) -> float:
    """The trainer's logged loss at `step` (nats per byte, the mean over its log window),
    averaged over the experts."""
    values = []
    for expert in experts:
        at = [row["loss"] for row in protocol.logged_losses(manifest, expert)
              if row["step"] == step]
        values.append(at[-1] if at else float("nan"))
    return float(np.mean(values))


@dataclass
class Heldout:
    """The held-out texts every arm is scored on, in the same order for every arm."""

    texts: list[str]
    data: ScoredTexts  # prefixes, tokens and which bytes are scored
    bytes: torch.Tensor  # [N] scored bytes per text
    language: list[str] | None
    cluster: dict[str, torch.Tensor]  # each ensemble arm's cluster of each text


def read_split(manifest: Manifest, clusters: int) -> tuple[list[str], np.ndarray,
                                                           list[str] | None]:
    """Every held-out text in dataset order, its cluster, and its language when the shards
    keep one."""
    urls = split_urls(manifest.layout, clusters, "heldout")
    chosen = choose_rows(urls, None, 0)
    columns = ["text"] + (["language"] if "language" in schema_of(urls[0]).names else [])
    texts: list[str] = [""] * len(chosen)
    language: list[str] = [""] * len(chosen)
    cluster = np.empty(len(chosen), np.int64)
    for part in read_chosen(urls, chosen, columns):
        for at, text in zip(part.at.tolist(), part.table.column("text").to_pylist(),
                            strict=True):
            texts[at] = text
        if "language" in columns:
            for at, value in zip(part.at.tolist(), part.table.column("language").to_pylist(),
                                 strict=True):
                language[at] = str(value)
        cluster[part.at] = part.cluster
    return texts, cluster, language if "language" in columns else None


def draw_heldout(arms: dict[str, Arm], count: int, prefix_bytes: int, context: int,
                 seed: int) -> Heldout:
    """A seeded sample of `count` held-out texts longer than the routing prefix, with every
    ensemble arm's cluster of each; the held-out split is the same in every run."""
    dense = arms["dense"]
    assert dense.manifest is not None
    texts, _, language = read_split(dense.manifest, 1)
    longer = [i for i, text in enumerate(texts) if len(text.encode("utf-8")) > prefix_bytes]
    order = torch.randperm(len(longer), generator=torch.Generator().manual_seed(seed + 101))
    index = sorted(longer[i] for i in order[:count].tolist())
    if not index:
        raise RuntimeError(f"no held-out text is longer than {prefix_bytes} bytes")
    clusters: dict[str, torch.Tensor] = {}
    for name, arm in arms.items():
        if not arm.ensemble:
            continue
        assert arm.manifest is not None
        theirs, cluster, _ = read_split(arm.manifest, arm.clusters)
        if theirs != texts:
            raise RuntimeError(f"{name}: its held-out texts differ from the dense run's")
        clusters[name] = torch.from_numpy(cluster[index])
    chosen = [texts[i] for i in index]
    sequences = [[*encode(text), EOS][: context + 1] for text in chosen]
    tokens = torch.full((len(sequences), max(map(len, sequences))), PAD, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence)
    targets = tokens[:, 1:]
    # Target j is byte j of the text (token 0 is BOS): score the bytes after the prefix.
    scored = (targets != PAD) & (torch.arange(targets.shape[1])[None] >= prefix_bytes)
    prefixes = [text.encode("utf-8")[:prefix_bytes].decode("utf-8", errors="ignore")
                for text in chosen]
    data = ScoredTexts(prefixes, tokens, scored, torch.zeros(len(chosen), dtype=torch.long), 0)
    return Heldout(chosen, data, scored.sum(1), [language[i] for i in index]
                   if language else None, clusters)


@torch.no_grad()
def target_log_probs(model: torch.nn.Module, data: ScoredTexts, batch: int = 64
                     ) -> torch.Tensor:
    """log p(byte) of every scored byte [N, T - 1] (0 where not scored)."""
    parts = []
    for start in range(0, len(data.tokens), batch):
        tokens = data.tokens[start : start + batch]
        log_p = torch.log_softmax(model(tokens[:, :-1]).float(), dim=-1)
        parts.append(log_p.gather(2, tokens[:, 1:, None]).squeeze(2))
    return torch.cat(parts).double().masked_fill(~data.scored, 0.0)


@torch.no_grad()
def score_point(arm: Arm, point: dict[str, Any], heldout: Heldout,
                temperature: float) -> dict[str, dict[str, torch.Tensor]]:
    """Each text's NLL at one snapshot, EMA and raw: one model, or the ensemble with top-1,
    full and oracle routing (each expert run once for all three)."""
    assert arm.manifest is not None
    data = heldout.data
    single = len(point["experts"]) == 1
    probs = (None if single else
             CentroidRouter.from_run(arm.manifest, temperature).probabilities(data.prefixes))
    if probs is not None:
        chosen = probs.argmax(1) == heldout.cluster[arm.name]
        arm.router_accuracy = chosen.double().mean().item()
    out: dict[str, dict[str, torch.Tensor]] = {}
    rows = torch.arange(len(data.tokens))
    for kind in WEIGHTS:
        log_p = torch.stack([
            target_log_probs(load_expert_at(arm.manifest, k, point["snapshot_step"], kind),
                             data) for k in point["experts"]])  # [K, N, T - 1]
        if probs is None:
            nll = -log_p[0].sum(1)
            out[kind] = {routing: nll for routing in ROUTINGS}
            continue
        weights = (probs / probs.sum(1, keepdim=True)).double()  # strategy full
        mixed = torch.logsumexp(log_p + weights.T.log()[:, :, None], dim=0)
        out[kind] = {"top1": -log_p[probs.argmax(1), rows].sum(1),
                     "full": -mixed.masked_fill(~data.scored, 0.0).sum(1),
                     "oracle": -log_p[heldout.cluster[arm.name], rows].sum(1)}
    return out


def check_against_engine(arm: Arm, heldout: Heldout, temperature: float) -> None:
    """The final EMA ensemble's top-1 and full NLL through the ensemble engine, as the eval
    stage computes it: it must agree with the scores above."""
    assert arm.manifest is not None
    experts = [load_expert_at(arm.manifest, k, None, "ema") for k in range(arm.clusters)]
    ensemble = Ensemble(experts, CentroidRouter.from_run(arm.manifest, temperature),
                        mix_log_probs)
    final = arm.points[-1]
    if final["snapshot_step"] != arm.steps:
        raise RuntimeError(f"{arm.name}: the last point is not the final step")
    for routing in ("top1", "full"):
        weights = ensemble.route((heldout.data.prefixes,), Routing(routing, 2))
        total, _ = negative_log_likelihood(ensemble, heldout.data, weights)
        ours = arm.nll[-1]["ema"][routing].sum().item()
        if not math.isclose(total, ours, rel_tol=1e-4):
            raise RuntimeError(f"{arm.name} {routing}: {ours} nats here, {total} by the engine")


def bits_per_byte(nll: torch.Tensor, count: torch.Tensor) -> float:
    return nll.sum().item() / LN2 / max(count.sum().item(), 1)


def paired(a: torch.Tensor, b: torch.Tensor, count: torch.Tensor) -> dict[str, float]:
    """Bits per byte of a minus b over the same texts, its standard error over texts (the
    bytes of each text fixed), and both relative to b."""
    diff = (a - b) / LN2
    total = max(count.sum().item(), 1)
    gap = diff.sum().item() / total
    se = diff.std().item() * math.sqrt(len(diff)) / total if len(diff) > 1 else float("nan")
    base = b.sum().item() / LN2 / total
    return {"gap": gap, "se": se, "relative": gap / base, "relative_se": se / base,
            "bits_per_byte": base + gap, "their_bits_per_byte": base}


def gap_rows(ours: Arm, theirs: Arm, kind: str, routing: str,
             heldout: Heldout) -> list[dict[str, float]]:
    """The gap at each point (the same fraction of S: the same training FLOPs)."""
    return [{"point": point["point"], "flops": point["flops"], "tokens": point["tokens"],
             **paired(mine[kind][routing], their[kind]["full"], heldout.bytes)}
            for point, mine, their in zip(ours.points, ours.nll, theirs.nll, strict=True)]


def crossing(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Whether the gap falls (moves the ensemble's way) from the first point to the last,
    where it first goes from above zero to below (interpolated in log FLOPs and log
    tokens), and at which points it is below zero."""
    first, last = rows[0], rows[-1]
    out: dict[str, Any] = {"falls": last["gap"] < first["gap"],
                           "below_zero_from_start": first["gap"] < 0,
                           "below_zero_at": [row["point"] for row in rows if row["gap"] < 0],
                           "crosses_at_flops": None, "crosses_at_tokens": None,
                           "ahead_at_end": last["gap"] < 0,
                           "significant_at_end": abs(last["gap"]) > 2 * last["se"]}
    for before, after in itertools.pairwise(rows):
        if before["gap"] >= 0 > after["gap"]:
            for key in ("flops", "tokens"):
                out[f"crosses_at_{key}"] = protocol.log_crossing(before, after, key)
            break
    return out


def judge(row: dict[str, float]) -> str:
    if not abs(row["gap"]) > 2 * row["se"]:
        return "no clear difference"
    return "ahead" if row["gap"] < 0 else "behind"


def compute_gaps(arms: dict[str, Arm], heldout: Heldout, ks: list[int]) -> dict[str, Any]:
    gaps: dict[str, Any] = {}
    for K in ks:
        for kind in WEIGHTS:
            table: dict[str, Any] = {}
            for ours, routing, theirs in COMPARISONS:
                mine = arms[f"{ours}-k{K}"]
                other = arms[theirs if theirs == "dense" else f"{theirs}-k{K}"]
                rows = gap_rows(mine, other, kind, routing, heldout)
                table[f"{ours}_{routing}_vs_{theirs}"] = {"rows": rows,
                                                          "summary": crossing(rows)}
            gaps[f"k{K}"] = gaps.get(f"k{K}", {}) | {kind: table}
    return gaps


def per_language(arms: dict[str, Arm], heldout: Heldout, ks: list[int]) -> dict[str, Any]:
    """Bits per byte at S of every arm (ensembles: full) per language, and the gap of the
    k-means ensemble to the dense model and to the small-batch one."""
    if heldout.language is None:
        return {}
    languages = sorted(set(heldout.language))
    out: dict[str, Any] = {}
    for language in languages:
        mask = torch.tensor([value == language for value in heldout.language])
        count = heldout.bytes[mask]
        row: dict[str, Any] = {"texts": int(mask.sum()), "bytes": int(count.sum()),
                               "bits_per_byte": {}, "gaps": {}}
        for kind in WEIGHTS:
            row["bits_per_byte"][kind] = {
                name: bits_per_byte(arm.nll[-1][kind]["full"][mask], count)
                for name, arm in arms.items()}
            row["gaps"][kind] = {
                f"k{K}_{theirs}": paired(arms[f"kmeans-k{K}"].nll[-1][kind]["full"][mask],
                                         arms[theirs if theirs == "dense" else
                                              f"{theirs}-k{K}"].nll[-1][kind]["full"][mask],
                                         count)
                for K in ks for theirs in ("dense", "dense-small")}
        out[language] = row
    return out


def best_k(arms: dict[str, Arm], heldout: Heldout, ks: list[int], kind: str) -> list[int]:
    """At each point, the K (1: dense) whose model has the fewest held-out bits per byte
    (ensembles: full)."""
    best = []
    for index in range(len(POINTS)):
        scores = {1: bits_per_byte(arms["dense"].nll[index][kind]["full"], heldout.bytes)}
        for K in ks:
            scores[K] = bits_per_byte(arms[f"kmeans-k{K}"].nll[index][kind]["full"],
                                      heldout.bytes)
        best.append(min(scores, key=scores.__getitem__))
    return best


def verdicts(arms: dict[str, Arm], gaps: dict[str, Any], languages: dict[str, Any],
             heldout: Heldout, ks: list[int]) -> list[str]:
    lines = []
    for kind in WEIGHTS:
        choices = best_k(arms, heldout, ks, kind)
        lines.append(f"[{kind}] best K by compute point (1: dense): " + ", ".join(
            f"{name} {k}" for name, k in zip(POINT_NAMES, choices, strict=True)) + ".")
    for K in ks:
        for kind in WEIGHTS:
            tag = f"[K={K}, {kind}]"
            main = gaps[f"k{K}"][kind]["kmeans_full_vs_dense"]
            rows, summary = main["rows"], main["summary"]
            path = ", ".join(f"{100 * r['relative']:+.1f}% at {r['flops']:.3g}" for r in rows)
            if summary["below_zero_from_start"]:
                above = [row["point"] for row in rows if row["gap"] >= 0]
                crossed = (f"is below zero at {', '.join(summary['below_zero_at'])}"
                           + (f" and above it at {', '.join(above)}" if above else ""))
            elif summary["crosses_at_flops"]:
                crossed = (f"first crosses zero at about {summary['crosses_at_flops']:.3g} "
                           f"FLOPs ({summary['crosses_at_tokens']:.3g} tokens), below zero at "
                           f"{', '.join(summary['below_zero_at'])}")
            else:
                crossed = "does not cross zero at these FLOPs"
            lines.append(f"{tag} c-BTM (k-means experts, full mixture) minus dense in bits per "
                         f"byte: {path}; from the first point to S the gap "
                         f"{'falls' if summary['falls'] else 'does not fall'}; it {crossed}; "
                         f"at S: {judge(rows[-1])}.")
            top1 = gaps[f"k{K}"][kind]["kmeans_top1_vs_dense"]["rows"][-1]
            oracle = gaps[f"k{K}"][kind]["kmeans_oracle_vs_dense"]["rows"][-1]
            if "ahead" in (judge(rows[-1]), judge(top1)):
                lines.append(f"{tag} routed by its prefix (full or top-1) the ensemble is "
                             "ahead at S: the router is not the limit here.")
            elif judge(oracle) == "ahead":
                lines.append(f"{tag} only oracle routing is ahead at S "
                             f"({100 * oracle['relative']:+.1f}%, full "
                             f"{100 * rows[-1]['relative']:+.1f}%): the router is the limit.")
            else:
                lines.append(f"{tag} not even oracle routing is ahead at S "
                             f"({100 * oracle['relative']:+.1f}%, {judge(oracle)}): the experts "
                             "themselves are behind or level, not only the router.")
            small = gaps[f"k{K}"][kind]["kmeans_full_vs_dense-small"]["rows"][-1]
            control = gaps[f"k{K}"][kind]["dense-small_full_vs_dense"]["rows"][-1]
            if judge(rows[-1]) == "ahead" and judge(small) != "ahead":
                lines.append(f"{tag} the ensemble's lead over the dense model "
                             f"({100 * rows[-1]['relative']:+.1f}%) is gone against the "
                             f"small-batch dense model ({100 * small['relative']:+.1f}%): it "
                             "came from the batch size.")
            elif judge(rows[-1]) == "ahead":
                lines.append(f"{tag} the lead survives the batch-size control: "
                             f"{100 * small['relative']:+.1f}% against the small-batch dense "
                             "model.")
            else:
                lines.append(f"{tag} no lead to explain; the small-batch dense model is "
                             f"{100 * control['relative']:+.1f}% against the dense one "
                             f"({judge(control)}), the ensemble "
                             f"{100 * small['relative']:+.1f}% against it.")
            for other, label in (("btm", "BTM experts (branched at S/4)"),
                                 ("random", "experts on a random partition")):
                row = gaps[f"k{K}"][kind][f"{other}_full_vs_dense"]["rows"][-1]
                lines.append(f"{tag} {label} minus dense at S: "
                             f"{100 * row['relative']:+.1f}% ({judge(row)}).")
            if languages:
                parts = [f"{language} {100 * row['gaps'][kind][f'k{K}_dense']['relative']:+.1f}%"
                         for language, row in languages.items()]
                lines.append(f"{tag} c-BTM minus dense at S by language: {', '.join(parts)}.")
    return lines


def bpb_table(arms: dict[str, Arm], heldout: Heldout, args: argparse.Namespace) -> Table:
    table = Table(title=f"held-out bits per byte on {len(heldout.texts)} texts "
                        f"({int(heldout.bytes.sum()):,} bytes scored after a "
                        f"{args.prefix_bytes}-byte routing prefix), at each snapshot")
    for column in ("arm", "point", "step", "batch", "tokens", "train FLOPs", "train loss",
                   *(f"{kind} {routing}" for kind in WEIGHTS for routing in ROUTINGS)):
        table.add_column(column, justify="left" if column in ("arm", "point") else "right")
    for arm in arms.values():
        for point, nll in zip(arm.points, arm.nll, strict=True):
            single = len(point["experts"]) == 1
            batch = arm.seed_batch if point["experts"] == [-1] else arm.batch
            cells = ["-" if single and routing != "full"
                     else f"{bits_per_byte(nll[kind][routing], heldout.bytes):.4f}"
                     for kind in WEIGHTS for routing in ROUTINGS]
            table.add_row(arm.name, point["point"], str(point["step"]), str(batch),
                          f"{point['tokens']:.3g}", f"{point['flops']:.3g}",
                          f"{point['train_loss'] / LN2:.4f}", *cells)
    table.caption = ("single models in the full columns; BTM up to S/4 is its seed model; "
                     "train loss in bits per byte, the trainer's mean over its log window")
    return table


def comparison_table(gaps: dict[str, Any]) -> Table:
    return protocol.gap_table(
        "ensemble minus baseline in held-out bits per byte, paired over the "
        "texts (negative: the first is ahead)",
        {f"{k_name} {kind} {name.replace('_vs_', ' vs ')}": value["rows"]
         for k_name, by_kind in gaps.items()
         for kind, comparisons in by_kind.items()
         for name, value in comparisons.items()},
        "+- two standard errors, in % of the baseline's bits per byte")


def language_table(languages: dict[str, Any], ks: list[int]) -> Table:
    table = Table(title="bits per byte at S by language (EMA weights; ensembles full)")
    for column in ("language", "texts", "bytes", "dense",
                   *(f"k-means K={K}" for K in ks), *(f"vs dense K={K}" for K in ks),
                   *(f"vs small-batch K={K}" for K in ks)):
        table.add_column(column, justify="left" if column == "language" else "right")
    for language, row in languages.items():
        bpb, gaps = row["bits_per_byte"]["ema"], row["gaps"]["ema"]
        table.add_row(language, str(row["texts"]), f"{row['bytes']:,}", f"{bpb['dense']:.4f}",
                      *(f"{bpb[f'kmeans-k{K}']:.4f}" for K in ks),
                      *(protocol.relative_cell(gaps[f"k{K}_{theirs}"])
                        for theirs in ("dense", "dense-small") for K in ks))
    return table


def plots(arms: dict[str, Arm], gaps: dict[str, Any], languages: dict[str, Any],
          heldout: Heldout, ks: list[int], out: Path) -> list[str]:
    """Bits per byte vs training FLOPs per arm; the gaps vs FLOPs with their bands; the
    gap at S by language."""
    written = []
    panels = [(K, kind) for K in ks for kind in WEIGHTS]
    figure, axes = subplots(len(panels), (5.5 * len(panels), 4.5))
    for axis, (K, kind) in zip(np.atleast_1d(axes), panels, strict=True):
        for arm in arms.values():
            if arm.k not in (1, K):
                continue
            axis.plot([p["flops"] for p in arm.points],
                      [bits_per_byte(nll[kind]["full"], heldout.bytes) for nll in arm.nll],
                      marker="o", label=arm.name)
        axis.set(xscale="log", xlabel="training FLOPs", ylabel="held-out bits per byte",
                 title=f"K = {K}, {kind} weights (ensembles: full mixture)")
        _readable_log_ticks(axis)
        axis.legend()
    written.append(protocol.save_png(figure, out, "bpb"))
    figure, axes = subplots(len(panels), (5.5 * len(panels), 4.5))
    for axis, (K, kind) in zip(np.atleast_1d(axes), panels, strict=True):
        for name, color in (("kmeans_full_vs_dense", "tab:blue"),
                            ("kmeans_oracle_vs_dense", "tab:green"),
                            ("kmeans_full_vs_dense-small", "tab:orange"),
                            ("btm_full_vs_dense", "tab:purple")):
            protocol.plot_gap(axis, gaps[f"k{K}"][kind][name]["rows"], color,
                              name.replace("_vs_", " vs "))
        axis.axhline(0, color="grey", linestyle="--")
        axis.set(xscale="log", xlabel="training FLOPs", ylabel="bits per byte gap (+- 2 s.e.)",
                 title=f"ensemble minus baseline, K = {K}, {kind} weights")
        _readable_log_ticks(axis)
        axis.legend()
    written.append(protocol.save_png(figure, out, "gap"))
    if languages:
        names = list(languages)
        figure, axes = subplots(len(WEIGHTS), (2 * max(6.0, 0.5 * len(names) * len(ks) + 2), 4.5))
        width = 0.8 / len(ks)
        for axis, kind in zip(np.atleast_1d(axes), WEIGHTS, strict=True):
            for index, K in enumerate(ks):
                rows = [languages[name]["gaps"][kind][f"k{K}_dense"] for name in names]
                axis.bar(np.arange(len(names)) + (index - (len(ks) - 1) / 2) * width,
                         [r["gap"] for r in rows], width=width,
                         yerr=[2 * r["se"] for r in rows], capsize=3, label=f"K = {K}")
            axis.axhline(0, color="grey", linestyle="--")
            axis.set_xticks(np.arange(len(names)), names)
            axis.set(ylabel="bits per byte gap at S (+- 2 s.e.)",
                     title=f"c-BTM (full) minus dense by language, {kind} weights")
            axis.legend()
        written.append(protocol.save_png(figure, out, "languages"))
    return written


def finite(value: Any) -> Any:
    """The report with NaN (the standard error of a language with one held-out text) as
    null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def _readable_log_ticks(axis: Any) -> None:
    """Under a decade of FLOPs gets labelled minor ticks: tilt them so they do not overlap."""
    axis.tick_params(axis="x", which="both", labelsize=8, labelrotation=30)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="builtin:fortunes-multilingual",
                        help="The text source: a builtin by name (builtin:fortunes: four "
                             "languages) or a Parquet path/URL with a text column (a language "
                             "column gives per-language figures).")
    parser.add_argument("--sample-rows", type=int, default=8000,
                        help="Texts drawn from the source (seeded), held-out ones included.")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4],
                        help="Expert counts K; each must divide --batch.")
    parser.add_argument("--steps", type=int, default=256,
                        help="S: every arm's steps (a multiple of 16).")
    parser.add_argument("--batch", type=int, default=16,
                        help="B: the dense model's batch, in windows of --context bytes.")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    protocol.add_schedule_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.1,
                        help="The centroid router's softmax temperature.")
    parser.add_argument("--heldout-texts", type=int, default=400)
    parser.add_argument("--prefix-bytes", type=int, default=32,
                        help="Bytes of each held-out text used for routing, not scored.")
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads of each expert's worker (a single model gets "
                             "islands x threads).")
    protocol.add_run_arguments(parser, "cbtm-protocol.json", "<stem>-bpb.png, ...",
                               "A smoke run: S = 16, B = 4, K = 2, a tiny model, 400 texts.")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.ks, args.context = 16, 4, [2], 64
        args.width, args.depth, args.heads = 16, 1, 2
        args.sample_rows, args.heldout_texts, args.prefix_bytes = 400, 30, 16
    args.ks = sorted(set(args.ks))
    protocol.check_steps(parser, args)
    if min(args.ks) < 2 or any(args.batch % K for K in args.ks):
        parser.error("--ks: expert counts of at least 2, each dividing --batch (each "
                     "expert's batch is B/K)")
    if args.prefix_bytes >= args.context:
        parser.error("--prefix-bytes: fewer than --context (the rest is scored)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    console = protocol.wide_console(200)
    started = time.perf_counter()
    storage_url = protocol.storage_for(args, "cbtm-protocol-")
    arms = build_arms(args)
    with protocol.one_ray(arm_config(arms["dense"], storage_url, args)):
        for arm in arms.values():
            train(arm, storage_url, args, console)

    torch.set_num_threads(args.islands * args.threads)
    for arm in arms.values():
        plan_points(arm, args.context)
    heldout = draw_heldout(arms, args.heldout_texts, args.prefix_bytes, args.context,
                           args.seed)
    with console.status("scoring every snapshot"):
        for arm in arms.values():
            arm.nll = [score_point(arm, point, heldout, args.temperature)
                       for point in arm.points]
            if arm.kind == "kmeans":
                check_against_engine(arm, heldout, args.temperature)

    gaps = compute_gaps(arms, heldout, args.ks)
    languages = per_language(arms, heldout, args.ks)
    reference = arms[f"kmeans-k{args.ks[0]}"]
    assert reference.manifest is not None
    stats = reference.manifest.stage("partition")["stats"]
    console.print(bpb_table(arms, heldout, args))
    console.print(comparison_table(gaps))
    if languages:
        console.print(language_table(languages, args.ks))
    lines = verdicts(arms, gaps, languages, heldout, args.ks)
    for line in lines:
        console.print(line, highlight=False, markup=False)
    out = Path(args.out)
    pictures = plots(arms, gaps, languages, heldout, args.ks, out)
    wall = time.perf_counter() - started
    report = {
        "args": vars(args), "storage": storage_url, "wall_seconds": wall,
        "corpus": stats.get("corpus"), "features": stats.get("features", DEFAULT_FEATURES),
        "points": list(POINT_NAMES),
        "heldout": {"texts": len(heldout.texts), "bytes": int(heldout.bytes.sum()),
                    "prefix_bytes": args.prefix_bytes,
                    "languages": ({name: heldout.language.count(name)
                                   for name in sorted(set(heldout.language))}
                                  if heldout.language else None)},
        "arms": {name: {
            "kind": arm.kind, "k": arm.k, "experts": arm.clusters, "partition": arm.method,
            "steps": arm.steps, "batch": arm.batch, "seed_steps": arm.seed_steps,
            "seed_batch": arm.seed_batch, "flops_per_sample": arm.flops_per_sample,
            "wall_seconds": arm.wall_seconds,
            "cluster_sizes": arm.manifest.stage("partition")["stats"].get("sizes")
            if arm.manifest is not None else None,
            "router_accuracy": arm.router_accuracy,
            "points": [{**point, "train_bits_per_byte": point["train_loss"] / LN2,
                        "bits_per_byte": {kind: {routing: bits_per_byte(nll[kind][routing],
                                                                        heldout.bytes)
                                                 for routing in ROUTINGS}
                                          for kind in WEIGHTS}}
                       for point, nll in zip(arm.points, arm.nll, strict=True)],
        } for name, arm in arms.items()},
        "gaps": gaps, "per_language": languages,
        "best_k": {kind: dict(zip(POINT_NAMES, best_k(arms, heldout, args.ks, kind),
                                  strict=True)) for kind in WEIGHTS},
        "verdicts": lines, "plots": pictures,
    }
    protocol.write_report(out, finite(report), pictures, storage_url, wall, console)
    return report


if __name__ == "__main__":
    main()
