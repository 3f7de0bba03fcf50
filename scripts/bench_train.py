"""Benchmark one expert trained through `islands` against a bare PyTorch loop.

    python scripts/bench_train.py [--config configs/quickstart-image.yaml] [--steps 300]
                                  [--rounds 3] [--checkpoint-every 50] [--sync]
                                  [--upload-s S] [--json PATH]

Runs the config's partition stage once into a temp dir, starts its own local Ray
(num_cpus=2), then alternates, `--rounds` times (the order rotates every round):

  bare          a user's plain loop: the expert's model from the registry, the same shard
                tensors (the objective's batch and loss), batch size and thread count, AdamW
                at a fixed lr; no EMA, clipping, checkpoints or logging.
  matched       the bare loop plus what islands does besides the framework: gradient
                clipping, the EMA (one fused lerp) and its heap setting (`keep_freed_memory`),
                so `vs matched` is the cost of the framework alone.
  islands       `train_on_island`, the Ray task the driver launches, on the expert's spec:
                checkpoints every `--checkpoint-every` steps (the config's interval scaled
                down so several land in the measured window), metrics, expert log, progress
                reports and wandb offline on.
  islands-sync  (--sync) the same with checkpoints written before the next step, as before
                background checkpointing.

--upload-s S makes every checkpoint of the islands variants take S seconds longer to store,
as an upload to an object store would: what background checkpointing is for.

All run as Ray tasks, each in a fresh worker process (max_calls=1: no run inherits another's
heap or imports). Ray starts its workers at niceness 15, so on a busy machine a loop in this
process would get more CPU than the expert does.

Reading the columns:
  samples/s     steady state: samples from the report at step `--warmup` to the last one
                (step == steps) over the wall time between them, stamped where the reports
                arrive (a progress actor like the driver's); every run reports at the same
                steps. Startup, the final checkpoint and the final weights are outside it.
  vs bare       samples/s over the bare loop's in the same round; median [min, max]
                (vs matched likewise).
  best interval the fastest checkpoint interval (step k to k + checkpoint_every, one
                checkpoint each) of the run, in samples/s: when other work shares the
                machine, the least disturbed stretch estimates the run's own speed best.
  CPU ms/step   CPU time of the training process (all its threads) per step over the same
                window; resolves small differences when the machine is busy and wall times
                are noisy. Work moved to a background thread still counts here.
  stall s/ckpt  per checkpoint, the time the training thread was blocked, as the worker logs
                it (`checkpoint at step N (training stalled S s)`).
  write s/ckpt  per checkpoint, how long storing it took (`... stored in S s`): in the
                background, or inside the stall for islands-sync.
JSON only: startup_s, from submitting the task to its first report (step 0; shorter once a
Ray worker has imported everything), and total_s, the whole task.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import ray
import torch
from rich.console import Console
from rich.table import Table

from orchestrator.control.expert_specs import expert_spec
from orchestrator.control.ray_tasks import train_on_island
from orchestrator.modalities import modality_of
from orchestrator.pipeline import run_pipeline
from orchestrator.state.config import load_config
from orchestrator.state.manifest import Manifest
from orchestrator.state.run_config import layout_for
from runstore import storage
from runstore.layout import RunLayout
from runstore.log_parts import read_log
from worker.models import build_model
from worker.objectives import make_objective
from worker.train import ExpertSpec, keep_freed_memory, shard_urls

Stamp = tuple[float, float, dict[str, Any]]  # arrival time, worker CPU seconds, report row


@ray.remote(num_cpus=0)
class StampedBoard:
    """The progress actor's `report`, noting when each row arrives and the CPU time of the
    task `watch` named so far (found by its process title among the raylet's workers)."""

    def __init__(self) -> None:
        self.rows: list[Stamp] = []
        self.title = ""
        self.process: psutil.Process | None = None

    def watch(self, task_name: str) -> None:
        self.title, self.process, self.rows = f"ray::{task_name}", None, []

    def report(self, row: dict[str, Any]) -> None:
        if self.process is None:
            workers = psutil.Process(os.getppid()).children()
            self.process = next(p for p in workers if p.cmdline()[:1] == [self.title])
        cpu = self.process.cpu_times()
        self.rows.append((time.perf_counter(), cpu.user + cpu.system, row))

    def take(self) -> list[Stamp]:
        return self.rows


@ray.remote(max_retries=0, max_calls=1)
def islands_task(spec: ExpertSpec, root: str, board: Any, upload_s: float) -> dict[str, Any]:
    """The driver's task function itself, in a fresh worker process per run; with
    `upload_s`, each checkpoint first waits that long, as an upload to remote storage would
    (a sleep, which releases the GIL as network I/O does)."""
    if upload_s:
        import worker.train as train_module

        store = train_module.write_checkpoint

        def uploading(folder: str, files: Any, step: int) -> dict[str, str]:
            time.sleep(upload_s)
            return store(folder, files, step)

        train_module.write_checkpoint = uploading
    return train_on_island._function(spec, root, board)


@ray.remote(max_retries=0, max_calls=1)
def bare_loop(spec: ExpertSpec, root: str, board: Any, matched: bool) -> None:
    if matched:
        keep_freed_memory()
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    objective = make_objective(spec.objective, shard_urls(spec, RunLayout(root)),
                               **spec.objective_kwargs)
    model = build_model(spec.model, **spec.model_kwargs)
    parameters = list(model.parameters())
    averages = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    generator = torch.Generator().manual_seed(spec.seed)
    order, cursor = torch.randperm(objective.rows, generator=generator), 0
    board.report.remote({"step": 0})
    for step in range(1, spec.steps + 1):
        if cursor + spec.batch_size > objective.rows:
            order, cursor = torch.randperm(objective.rows, generator=generator), 0
        batch = objective.batch(order[cursor:cursor + spec.batch_size], generator)
        cursor += spec.batch_size
        loss = objective.loss_sum(model, batch) / objective.units(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if matched:
            torch.nn.utils.clip_grad_norm_(parameters, spec.grad_clip)
        optimizer.step()
        if matched:
            with torch.no_grad():
                torch._foreach_lerp_(averages, parameters, 1.0 - spec.ema_decay)
        if step % spec.log_every == 0 or step == spec.steps:
            board.report.remote({"step": step, "loss": loss.item()})


def measure(variant: str, spec: ExpertSpec, layout: RunLayout, warmup: int,
            board: Any, upload_s: float) -> dict[str, Any]:
    bare = variant in ("bare", "matched")
    name = "bare-loop" if bare else f"expert-{spec.expert}"
    ray.get(board.watch.remote(name))
    storage.remove(layout.expert(spec.expert))  # a fresh expert, not a resumed one
    submitted = time.perf_counter()
    if bare:
        ray.get(bare_loop.options(num_cpus=spec.threads, name=name)
                .remote(spec, layout.root, board, variant == "matched"))
    else:
        task_spec = replace(spec, async_checkpoints=False) if variant == "islands-sync" else spec
        ray.get(islands_task.options(num_cpus=spec.threads, name=name)
                .remote(task_spec, layout.root, board, upload_s))
    total = time.perf_counter() - submitted
    stamps = {row["step"]: (at, cpu) for at, cpu, row in ray.get(board.take.remote())}
    (t0, cpu0), (t1, cpu1) = stamps[warmup], stamps[spec.steps]
    # Each checkpoint interval (step k to k + checkpoint_every) holds exactly one checkpoint.
    first = -(-warmup // spec.checkpoint_every) * spec.checkpoint_every
    marks = [s for s in range(first, spec.steps + 1, spec.checkpoint_every) if s in stamps]
    intervals = [spec.checkpoint_every * spec.batch_size / (stamps[b][0] - stamps[a][0])
                 for a, b in itertools.pairwise(marks)]
    stalls, writes = [], []
    if not bare:
        text = read_log(layout.expert_log(spec.expert))
        stalls = [float(s) for s in re.findall(r"training stalled ([\d.]+) s", text)]
        writes = [float(s) for s in re.findall(r"stored in ([\d.]+) s", text)]
    return {"variant": variant,
            "samples_per_s": (spec.steps - warmup) * spec.batch_size / (t1 - t0),
            "best_interval_samples_per_s": max(intervals, default=None),
            "interval_samples_per_s": intervals,
            "cpu_ms_per_step": 1000 * (cpu1 - cpu0) / (spec.steps - warmup),
            "stall_s": statistics.median(stalls) if stalls else None, "stalls_s": stalls,
            "writes_s": writes,
            "startup_s": stamps[0][0] - submitted, "total_s": total}


def spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f}\n[{min(values):.{digits}f}, " \
           f"{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart-image.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the rate")
    parser.add_argument("--sync", action="store_true",
                        help="also run islands with synchronous checkpoints")
    parser.add_argument("--upload-s", type=float, default=0.0,
                        help="seconds each checkpoint waits before it is written, as an "
                             "upload to remote storage would (islands variants)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    console = Console()
    variants = ["bare", "matched", "islands"] + (["islands-sync"] if args.sync else [])

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        config = load_config(args.config, {"storage": f"file://{tmp}",
                                           "tracking": {"wandb": "offline"}})
        run_pipeline(config, console, until="partition")
        layout = layout_for(config)
        stats = Manifest.load(layout).stage("partition")["stats"]
        recipe = modality_of(config).expert_recipe(config, stats)
        spec = expert_spec(config, layout, 0, config.islands.specs()[0], recipe,
                           steps=args.steps, checkpoint_every=args.checkpoint_every)
        if args.warmup % spec.log_every or args.warmup >= args.steps:
            parser.error(f"--warmup must be a multiple of log_every ({spec.log_every}) "
                         "below --steps")
        # address="local": our own Ray, never a cluster someone started on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        board = StampedBoard.remote()
        runs: list[dict[str, Any]] = []
        for index in range(args.rounds):
            shift = index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                # A wandb run of its own each time: the same id would resume the previous one.
                tracked = replace(spec, tracking={**spec.tracking,
                                                  "id": f"{spec.tracking['id']}-{len(runs)}"})
                run = {"round": index + 1, **measure(variant, tracked, layout, args.warmup,
                                                     board, args.upload_s)}
                runs.append(run)
                console.print(f"round {index + 1} {variant}: {run['samples_per_s']:.1f} "
                              f"samples/s, {run['cpu_ms_per_step']:.1f} CPU ms/step")
        ray.shutdown()

    for run in runs:
        same_round = {r["variant"]: r for r in runs if r["round"] == run["round"]}
        bare, matched = same_round["bare"], same_round["matched"]
        run["vs_bare"] = run["samples_per_s"] / bare["samples_per_s"]
        run["vs_matched"] = run["samples_per_s"] / matched["samples_per_s"]
        if run["best_interval_samples_per_s"] and bare["best_interval_samples_per_s"]:
            run["best_vs_bare"] = (run["best_interval_samples_per_s"]
                                   / bare["best_interval_samples_per_s"])
        run["cpu_vs_bare"] = bare["cpu_ms_per_step"] / run["cpu_ms_per_step"]
    summary = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {key: statistics.median(r[key] for r in mine) for key in
                            ("samples_per_s", "vs_bare", "vs_matched",
                             "best_interval_samples_per_s",
                             "best_vs_bare", "cpu_ms_per_step", "cpu_vs_bare", "startup_s")
                            if all(r.get(key) is not None for r in mine)}
        for key, name in (("stalls_s", "stall_s"), ("writes_s", "write_s")):
            values = [s for r in mine for s in r[key]]
            summary[variant][name] = statistics.median(values) if values else None

    table = Table(title=f"{config.run}: {spec.model}, batch {spec.batch_size}, {spec.threads} "
                        f"thread(s), steps {args.warmup}..{args.steps}, checkpoint every "
                        f"{spec.checkpoint_every}, log every {spec.log_every}, "
                        f"upload {args.upload_s:g} s/checkpoint; "
                        f"median \\[min, max] of {args.rounds} rounds")
    for column in ("variant", "samples/s", "vs bare", "vs matched", "best interval",
                   "best vs bare", "CPU ms/step", "CPU vs bare", "stall s/ckpt",
                   "write s/ckpt"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        stalls = [s for r in mine for s in r["stalls_s"]]
        writes = [s for r in mine for s in r["writes_s"]]
        table.add_row(variant, spread([r["samples_per_s"] for r in mine], 1),
                      spread([r["vs_bare"] for r in mine]),
                      spread([r["vs_matched"] for r in mine]),
                      spread([r["best_interval_samples_per_s"] for r in mine
                              if r["best_interval_samples_per_s"]], 1),
                      spread([r["best_vs_bare"] for r in mine if "best_vs_bare" in r]),
                      spread([r["cpu_ms_per_step"] for r in mine], 1),
                      spread([r["cpu_vs_bare"] for r in mine]), spread(stalls, 4),
                      spread(writes, 4))
    Console(width=max(console.width, 130)).print(table)
    text = json.dumps({"config": args.config, "steps": args.steps, "warmup": args.warmup,
                       "checkpoint_every": spec.checkpoint_every, "log_every": spec.log_every,
                       "batch_size": spec.batch_size, "threads": spec.threads,
                       "upload_s": args.upload_s,
                       "summary": summary, "runs": runs}, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
        console.print(f"results: {args.json}")
    else:
        print(text)


if __name__ == "__main__":
    main()
