"""Text evaluation (c-BTM): held-out perplexity and bits per byte for each strategy, each
expert on its own cluster and on the others, and a monolith baseline when given.

Each held-out text is routed on its first `prefix_bytes` bytes, and only the bytes after
that prefix are scored, so routing never sees what it is scored on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.table import Table

from orchestrator.ensemble import Ensemble, Routing
from orchestrator.ensemble.experts import load_student
from orchestrator.evaluate.pictures import figure_png, strategy_bars, subplots
from orchestrator.evaluate.report import add_model_rows, eval_table
from orchestrator.modalities.text.generation import load_ensemble, log_probs, mix_log_probs
from orchestrator.state.config import RunConfig
from orchestrator.state.manifest import Manifest
from runstore.errors import InputError
from runstore.shards import read_text_split
from runstore.split_sample import EVAL_ROWS
from worker.models.byte_lm import EOS, PAD, encode


@dataclass
class ScoredTexts:
    prefixes: list[str]
    tokens: torch.Tensor  # [N, T] padded with PAD
    scored: torch.Tensor  # [N, T - 1] bool: which targets count
    cluster: torch.Tensor  # [N]
    skipped: int


def check_scoreable(longest: int, texts: int, prefix_bytes: int) -> None:
    """Held-out texts are scored after their routing prefix: at least one must be longer
    (`longest`: UTF-8 bytes of the longest of the `texts` held-out texts)."""
    if longest <= prefix_bytes:
        raise InputError("eval.prefix_bytes", f"{prefix_bytes} leaves nothing to score: "
                         f"texts are routed on their first eval.prefix_bytes bytes and "
                         f"scored on the rest, and the longest of the {texts} held-out "
                         f"texts has {longest}; expected fewer than {longest}")


def heldout_texts(manifest: Manifest, clusters: int, rows: int, prefix_bytes: int,
                  context: int, seed: int) -> ScoredTexts:
    # Drawn from a seeded sample of at least EVAL_ROWS held-out texts.
    texts, labels = read_text_split(manifest.layout, clusters, "heldout",
                                    max(EVAL_ROWS, rows), seed)
    check_scoreable(max((len(text.encode("utf-8")) for text in texts), default=0),
                    len(texts), prefix_bytes)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    prefixes, sequences, clusters_of, skipped = [], [], [], 0
    for index in order:
        data = texts[index].encode("utf-8")
        if len(data) <= prefix_bytes:
            skipped += 1
            continue
        prefixes.append(data[:prefix_bytes].decode("utf-8", errors="ignore"))
        sequences.append([*encode(texts[index]), EOS][: context + 1])
        clusters_of.append(labels[index])
        if len(sequences) == rows:
            break
    length = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence)
    targets = tokens[:, 1:]
    position = torch.arange(targets.shape[1])[None]
    # Target j is byte j of the text (token 0 is BOS): score bytes after the prefix.
    scored = (targets != PAD) & (position >= prefix_bytes)
    return ScoredTexts(prefixes, tokens, scored, torch.tensor(clusters_of), skipped)


@torch.no_grad()
def negative_log_likelihood(ensemble: Ensemble, data: ScoredTexts, weights: torch.Tensor,
                            rows: torch.Tensor | None = None, batch: int = 64) -> tuple[float,
                                                                                        int]:
    """Summed NLL (nats) over scored bytes, and how many bytes were scored."""
    rows = torch.arange(len(data.tokens)) if rows is None else rows
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        tokens = data.tokens[part]
        log_p = log_probs(ensemble, tokens[:, :-1], weights[part])
        picked = log_p.gather(2, tokens[:, 1:, None]).squeeze(2)
        mask = data.scored[part]
        total -= picked[mask].sum().item()
        count += int(mask.sum())
    return total, count


def perplexity_row(nll: float, count: int) -> dict[str, float]:
    mean = nll / max(count, 1)
    return {"perplexity": math.exp(mean), "bits_per_byte": mean / math.log(2),
            "bytes": count}


def evaluate(config: RunConfig, manifest: Manifest) -> tuple[dict[str, Any], dict[str, bytes]]:
    torch.set_num_threads(config.router.threads)
    ensemble, metas = load_ensemble(manifest, config.router.temperature)
    context = metas[0]["context"]
    clusters = ensemble.clusters
    data = heldout_texts(manifest, clusters, config.eval.heldout_rows,
                         config.eval.prefix_bytes, context, config.seed)
    top_k = min(config.inference.top_k, clusters)
    report: dict[str, Any] = {"run": config.run, "modality": "text", "clusters": clusters,
                              "heldout_texts": len(data.tokens),
                              "skipped_short_texts": data.skipped,
                              "prefix_bytes": config.eval.prefix_bytes, "strategies": {},
                              "experts": []}
    for strategy in (config.eval.strategies if clusters > 1 else ("full",)):
        manifest.check_cancel()
        weights = ensemble.route((data.prefixes,), Routing(strategy, top_k))
        ensemble.expert_rows = 0
        row = perplexity_row(*negative_log_likelihood(ensemble, data, weights))
        row["expert_calls_per_text"] = ensemble.expert_rows / len(data.tokens)
        report["strategies"][strategy] = row
    if manifest.stage_done("distill"):
        report["distill"] = student_row(manifest, data)
    if ensemble.router is not None:
        chosen = ensemble.router.probabilities(data.prefixes).argmax(1)
        report["router_accuracy"] = (chosen == data.cluster).float().mean().item()
    for expert, meta in enumerate(metas):
        manifest.check_cancel()
        alone = Ensemble([ensemble.experts[expert]], None, mix_log_probs)
        ones = torch.ones(len(data.tokens), 1)
        row = {"expert": expert, "rows": meta["rows"], "steps": meta["steps"],
               "tokens_seen": meta["samples_seen"] * meta["context"],
               "train_flops": meta["train_flops"]}
        own = (data.cluster == expert).nonzero().squeeze(1)
        other = (data.cluster != expert).nonzero().squeeze(1)
        if len(own):
            row["own_cluster"] = perplexity_row(*negative_log_likelihood(alone, data, ones, own))
        if len(other) and clusters > 1:
            row["other_clusters"] = perplexity_row(*negative_log_likelihood(alone, data, ones,
                                                                             other))
        report["experts"].append(row)
    report["train_flops"] = {"experts": sum(m["train_flops"] for m in metas), "router": 0.0,
                             "router_share": 0.0}
    report["tokens_seen"] = sum(row["tokens_seen"] for row in report["experts"])
    headline = config.inference.strategy if clusters > 1 else "full"
    report["perplexity"] = report["strategies"][headline]["perplexity"]
    return report, {}


def student_row(manifest: Manifest, data: ScoredTexts) -> dict[str, Any]:
    """The distilled student on the strategies' held-out bytes: one model call per text,
    the inference cost of top1."""
    student, meta = load_student(manifest)
    alone = Ensemble([student], None, mix_log_probs)
    row = perplexity_row(*negative_log_likelihood(alone, data, torch.ones(len(data.tokens), 1)))
    row.update(expert_calls_per_text=alone.expert_rows / len(data.tokens), steps=meta["steps"],
               teacher_routing=meta["teacher"]["strategy"], model_kwargs=meta["model_kwargs"],
               train_flops=meta["train_flops"])
    return row


def attach_baseline(report: dict[str, Any], baseline: dict[str, Any]) -> None:
    report["baseline"] = {"run": baseline["run"], "perplexity": baseline["perplexity"],
                          "bits_per_byte": baseline["strategies"]["full"]["bits_per_byte"]
                          if baseline["clusters"] == 1 else None,
                          "tokens_seen": baseline["tokens_seen"],
                          "token_ratio": report["tokens_seen"] / max(baseline["tokens_seen"], 1)}


def report_tables(report: dict[str, Any]) -> list[Table]:
    table = eval_table(report, f"{report['heldout_texts']} held-out texts, scored after "
                               f"{report['prefix_bytes']} bytes",
                       ("perplexity/byte", "bits/byte", "expert calls/text"))
    add_model_rows(table, report, lambda row: [
        f"{row['perplexity']:.3f}", f"{row['bits_per_byte']:.3f}",
        f"{row['expert_calls_per_text']:.1f}"])
    for row in report["experts"]:
        own, other = row.get("own_cluster"), row.get("other_clusters")
        table.add_row(f"expert {row['expert']}, own cluster",
                      f"{own['perplexity']:.3f}" if own else "-",
                      f"{own['bits_per_byte']:.3f}" if own else "-", "",
                      f"on other clusters {other['perplexity']:.3f}" if other else "")
    baseline = report.get("baseline")
    if baseline:
        table.add_row(f"baseline {baseline['run']}", f"{baseline['perplexity']:.3f}",
                      f"{math.log2(baseline['perplexity']):.3f}", "",
                      f"our/its training tokens {baseline['token_ratio']:.2f}x")
    if "router_accuracy" in report:
        table.caption = (f"router picks the text's own cluster for "
                         f"{100 * report['router_accuracy']:.1f}% of held-out prefixes")
    return [table]


def report_png(report: dict, pictures: dict[str, bytes]) -> bytes:
    figure, axes = subplots(2, (11, 4.2))
    strategy_bars(axes[0], report, "perplexity", ".3f")
    axes[0].set(title="held-out perplexity per byte", ylabel="perplexity")
    experts = report["experts"]
    positions = np.arange(len(experts))
    own = [row.get("own_cluster", {}).get("perplexity", np.nan) for row in experts]
    other = [row.get("other_clusters", {}).get("perplexity", np.nan) for row in experts]
    axes[1].bar(positions - 0.2, own, width=0.4, label="own cluster")
    axes[1].bar(positions + 0.2, other, width=0.4, label="other clusters")
    axes[1].set_xticks(positions, [f"expert {row['expert']}" for row in experts])
    axes[1].set(title="each expert alone", ylabel="perplexity")
    axes[1].legend()
    return figure_png(figure)
