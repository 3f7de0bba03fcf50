"""Replicate c-BTM's headline at small scale: a dense byte LM against K = 2, 4 (8)
clustered experts trained on the same total number of tokens, on the fortunes corpus.

Every run uses the same sample, held-out texts and model size; only the number of
clusters changes, and each expert trains total_steps / K steps (same batch, same context),
so every row of the table saw the same number of training tokens.

    python scripts/replicate_cbtm.py --ks 2 4 --total-steps 2400 --out cbtm.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.pipeline import run_pipeline
from orchestrator.state.config import parse_config
from runstore import storage


def run_config(name: str, storage_url: str, clusters: int, steps: int,
               args: argparse.Namespace) -> dict:
    return {
        "run": name, "storage": storage_url, "seed": args.seed,
        "data": {"modality": "text", "source": "builtin:fortunes",
                 "sample_rows": args.sample_rows},
        "partition": {"clusters": max(clusters, 1)},
        "experts": {"monolith": clusters == 1, "context": args.context, "width": args.width,
                    "depth": args.depth, "heads": args.heads, "steps": steps,
                    "batch_size": args.batch_size, "lr": args.lr,
                    "warmup_steps": min(100, steps),  # the figures in the README
                    "checkpoint_every": max(steps // 2, 1),
                    # The dense model has the machine to itself: give it every island's CPUs.
                    "threads": args.threads * (args.islands if clusters == 1 else 1)},
        "islands": {"local": 1 if clusters == 1 else args.islands},
        "tracking": {"wandb": "disabled"},
        "inference": {"top_k": 2},
        "eval": {"heldout_rows": args.heldout_texts},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--total-steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sample-rows", type=int, default=8000)
    parser.add_argument("--heldout-texts", type=int, default=600)
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default=None, help="Where runs go (default: a temp dir).")
    parser.add_argument("--out", default="cbtm.json")
    args = parser.parse_args()

    console = Console()
    storage_url = args.storage or f"file://{tempfile.mkdtemp(prefix='cbtm-')}"
    results = []
    for clusters in [1, *args.ks]:
        steps = args.total_steps // clusters
        name = "monolith" if clusters == 1 else f"cbtm-k{clusters}"
        config = parse_config(run_config(name, storage_url, clusters, steps, args))
        started = time.perf_counter()
        manifest = run_pipeline(config, console)
        seconds = time.perf_counter() - started
        report = storage.read_json(storage.join(manifest.layout.eval, "report.json"))
        stats = manifest.stage("partition")["stats"]
        results.append({
            "clusters": clusters, "steps_per_expert": steps,
            "tokens_per_expert": steps * args.batch_size * args.context,
            "total_tokens": report["tokens_seen"], "corpus": stats["corpus"],
            "cluster_sizes": stats["sizes"], "balance_ratio": stats["balance_ratio"],
            "perplexity": {name: row["perplexity"] for name, row in
                           report["strategies"].items()},
            "bits_per_byte": {name: row["bits_per_byte"] for name, row in
                              report["strategies"].items()},
            "router_accuracy": report.get("router_accuracy"),
            "wall_seconds": seconds,
        })

    monolith = results[0]["perplexity"]["full"]
    table = Table(title=f"c-BTM at equal training tokens ({results[0]['corpus']}, "
                        f"{args.sample_rows} texts, byte LM {args.width}x{args.depth})")
    for column in ("K", "tokens/expert", "tokens", "top1", "top2", "full", "dense",
                   "best/dense"):
        table.add_column(column, justify="right")
    for row in results:
        ppl = row["perplexity"]
        best = min(ppl.values())
        table.add_row(str(row["clusters"]), f"{row['tokens_per_expert']:,}",
                      f"{row['total_tokens']:,}", f"{ppl.get('top1', ppl['full']):.3f}",
                      f"{ppl.get('topk', ppl['full']):.3f}", f"{ppl['full']:.3f}",
                      f"{monolith:.3f}", f"{100 * (best / monolith - 1):+.1f}%")
    table.caption = "held-out perplexity per byte (lower is better); routing on a 32-byte prefix"
    console.print(table)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
