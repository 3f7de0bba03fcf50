"""Benchmark `islands serve`: step-level batching under load, against one expert, one request
at a time and an `islands sample` loop.

    islands run configs/quickstart-image.yaml          # first: a finished image run
    python scripts/bench_serve.py --run runs/quickstart-image [--text-run RUN] [--json PATH]
                                  [--steps S] [--seconds 8] [--duration 20] [--quick]

Every server is `islands serve` started as a subprocess on a free port (its own local Ray),
every request one image (n=1) of S Euler steps (default: the run's inference steps), top-1
routing; clients are threads in this process speaking HTTP.

Arms:

  sweep C          closed loop: C clients each sending requests back to back for --seconds;
                   images/s, p50/p99 latency, mean rows per expert call (deltas of the
                   islands_serve_expert_call_rows histogram on /metrics)
  one expert C     the same, on a server of the same run reduced to expert 0 alone (a copy
                   of the run directory whose manifest lists one expert and no router: a
                   one-expert ensemble has no router, so each step is one expert call)
  many rows        16 clients of --images images each (a step of 16 x --images rows), on both
                   servers: top-1 against one expert where the groups are large
  one at a time    the sweep at C=1: what a server without batching across requests gets
  islands sample   a loop of `islands sample --n 1` processes (process start included)
  poisson X%       open loop: Poisson arrivals at X% of capacity (the best sweep rate) for
                   --duration; achieved rate, p50/p99, answers by HTTP status
  invariance       the largest difference between an image requested alone and the same
                   request stepped with 15 others: uint8 levels over HTTP, and float in
                   process (the lane's Denoising on the run's experts)
  deterministic    16 clients sending `deterministic: true` requests vs 16 normal ones
  text C           --text-run: streamed completions at C=1 and 16, bytes/s and time to
                   first byte
  deployments C    the sweep at C=1 and 16 with --layout deployments (one Serve deployment
                   per expert, a hop per step) vs inprocess: mean step seconds
                   (islands_serve_step_seconds) and images/s
  call cost        where small groups lose: one expert's forward (and the router's) timed in
                   process at 1 to 32 rows, fitted as fixed + per-row cost; from it, the
                   top-1 / one-expert step-time ratio a step of C rows split evenly over the
                   experts would get (the model the sweep's ratios are checked against)

Ratios are taken against baselines measured in the same run on the same machine. Targets:
top-1 at C=16 >= 0.85x the one-expert server at C=16; 16 clients >= 4x one at a time;
p99 <= 2x p50 at 80% load; no errors below capacity, only 429 above it. Figures without a
target have the verdict "info". --quick shrinks the arms to a smoke run and leaves out the
deployments layout and the `islands sample` loop (tests/test_serve.py covers the former).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.cli.common import open_run  # noqa: E402
from orchestrator.ensemble import Routing  # noqa: E402
from orchestrator.modalities.image.sampling import (  # noqa: E402
    Denoising,
    SampleRequest,
    load_ensemble,
)
from tests.serve_servers import Server, start_server, stop_server  # noqa: E402

TARGETS = {"one_expert": 0.85, "batching": 4.0, "tail": 2.0}
LOADS = (0.5, 0.8, 1.0, 1.2)


def post(url: str, body: dict[str, Any], timeout: float = 300) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""  # connection refused or reset: counted as status 0


def metric_sums(server: Server) -> dict[str, float]:
    """name -> value summed over labels, for the _sum and _count series of /metrics."""
    _, _, body = server.get("/metrics")
    totals: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{")[0].split(" ")[0]
        if name.endswith(("_sum", "_count")):
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def mean_delta(before: dict[str, float], after: dict[str, float], base: str) -> float:
    count = after.get(f"{base}_count", 0.0) - before.get(f"{base}_count", 0.0)
    total = after.get(f"{base}_sum", 0.0) - before.get(f"{base}_sum", 0.0)
    return total / count if count else math.nan


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def closed_loop(server: Server, clients: int, seconds: float, body: dict[str, Any]
                ) -> dict[str, Any]:
    """C clients each sending `body` back to back until `seconds` pass."""
    url = server.url + "/v1/images/generations"
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    before = metric_sums(server)
    start = time.perf_counter()
    stop = start + seconds

    def client(index: int) -> None:
        while time.perf_counter() < stop:
            sent = time.perf_counter()
            status, _ = post(url, {**body, "seed": index * 100003 + len(latencies)})
            with lock:
                statuses[status] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - sent)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    after = metric_sums(server)
    return {"clients": clients, "seconds": elapsed, "ok": len(latencies),
            "images_per_s": len(latencies) * body.get("n", 1) / elapsed,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "rows_per_expert_call": mean_delta(before, after, "islands_serve_expert_call_rows"),
            "step_s": mean_delta(before, after, "islands_serve_step_seconds"),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def open_loop(server: Server, rate: float, seconds: float, body: dict[str, Any]
              ) -> dict[str, Any]:
    """Poisson arrivals at `rate` requests/s for `seconds`, each on its own thread."""
    url = server.url + "/v1/images/generations"
    gaps = random.Random(0)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def one(seed: int) -> None:
        sent = time.perf_counter()
        status, _ = post(url, {**body, "seed": seed})
        with lock:
            statuses[status] += 1
            if status == 200:
                latencies.append(time.perf_counter() - sent)

    threads = []
    start = time.perf_counter()
    due = start
    while True:
        due += gaps.expovariate(rate)
        if due - start > seconds:
            break
        time.sleep(max(0.0, due - time.perf_counter()))
        thread = threading.Thread(target=one, args=(len(threads),))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"offered_per_s": rate, "sent": len(threads),
            "achieved_per_s": len(latencies) / elapsed,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def pixels(answer: bytes) -> np.ndarray:
    b64 = json.loads(answer)["data"][0]["b64_json"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def invariance_http(server: Server, body: dict[str, Any], deterministic: bool) -> float:
    """Largest uint8 difference of seed 7 alone vs seed 7 among 15 others sent at once."""
    url = server.url + "/v1/images/generations"
    body = {**body, "deterministic": deterministic}
    _, alone = post(url, {**body, "seed": 7})
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda s: post(url, {**body, "seed": s}), range(7, 23)))
    return float(np.abs(pixels(alone) - pixels(answers[0][1])).max())


def invariance_float(run: str, steps: int) -> float:
    """The same comparison in process, on the float images the lane's Denoising returns."""
    _, manifest = open_run(run)
    ensemble, metas = load_ensemble(manifest)
    shape = tuple(metas[0]["image_shape"])
    with torch.inference_mode():
        def request(seed: int) -> SampleRequest:
            return SampleRequest(1, steps, Routing("top1"), seed)
        alone = Denoising(ensemble, shape, [request(7)]).run()[0]
        batched = Denoising(ensemble, shape, [request(s) for s in range(7, 23)]).run()[0]
    return float((alone.float() - batched.float()).abs().max())


def timed(call: Callable[..., Any], inputs: tuple[Any, ...], repeats: int) -> float:
    """Median seconds of `call(*inputs)`, after two warm-up calls (kernels are chosen per
    shape)."""
    call(*inputs), call(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def call_cost(run: str, sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """One expert's and the router's forward time by rows, with a fixed + per-row fit."""
    _, manifest = open_run(run)
    ensemble, metas = load_ensemble(manifest)
    shape = tuple(metas[0]["image_shape"])
    expert, router = ensemble.experts[0], ensemble.router
    seconds: dict[str, dict[int, float]] = {"expert": {}, "router": {}}
    with torch.inference_mode():
        for rows in sizes:
            inputs = (torch.randn(rows, *shape), torch.rand(rows))
            seconds["expert"][rows] = timed(expert, inputs, repeats)
            if router is not None:
                seconds["router"][rows] = timed(router, inputs, repeats)
    fits = {}
    for name, by_rows in seconds.items():
        if len(by_rows) > 1:  # least squares over every size: s(n) = fixed + per_row * n
            per_row, fixed = np.polyfit(list(by_rows), list(by_rows.values()), 1)
            fits[name] = {"fixed_s": float(fixed), "per_row_s": float(per_row)}
    return {"seconds": {name: {str(k): v for k, v in rows.items()}
                        for name, rows in seconds.items()},
            "fit": fits, "experts": ensemble.clusters}


def modelled_ratio(cost: dict[str, Any], rows: int) -> float:
    """One-expert step time / top-1 step time at `rows` rows split evenly over the experts
    (each group one call), router included, from the fitted call costs."""
    expert, experts = cost["fit"]["expert"], cost["experts"]
    router = cost["fit"].get("router", {"fixed_s": 0.0, "per_row_s": 0.0})
    one = expert["fixed_s"] + expert["per_row_s"] * rows
    groups = min(experts, rows)
    top1 = (groups * expert["fixed_s"] + expert["per_row_s"] * rows
            + router["fixed_s"] + router["per_row_s"] * rows)
    return one / top1


def one_expert_run(run: str, into: Path) -> Path:
    """A copy of the run whose ensemble is expert 0 alone (no router: one expert needs none)."""
    source = Path(open_run(run)[1].layout.root.removeprefix("file://"))
    target = into / source.name
    (target / "experts").mkdir(parents=True)
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["partition"]["clusters"] = 1  # the router's loader reads the count here
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(source / "experts" / "expert-0" / "final",
                    target / "experts" / "expert-0" / "final")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["experts"] = {"0": manifest["experts"]["0"]}
    stage = manifest["stages"]["experts"]
    stage["artifacts"] = {path: entry for path, entry in stage["artifacts"].items()
                          if path.startswith("experts/expert-0/")}
    manifest["stages"]["router"].update(artifacts={}, skipped="one expert: no router")
    for name in ("eval", "partition"):
        manifest["stages"][name]["artifacts"] = {}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return target


def sample_loop(run: str, steps: int, count: int, scratch: Path) -> dict[str, Any]:
    """`islands sample --n 1` `count` times, one process each."""
    start = time.perf_counter()
    for index in range(count):
        subprocess.run([sys.executable, "-m", "orchestrator.cli.main", "sample", run, "--n",
                        "1", "--steps", str(steps), "--seed", str(index),
                        "--out", str(scratch / f"sample-{index}.png")],
                       check=True, capture_output=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    return {"images": count, "seconds": elapsed, "images_per_s": count / elapsed}


def text_arm(server: Server, clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """Streamed completions back to back: bytes/s of text and time to first byte."""
    url = server.url + "/v1/completions"
    firsts: list[float] = []
    total = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(index: int) -> None:
        while time.perf_counter() < stop:
            body = {"prompt": "the ", "max_tokens": max_tokens, "seed": index, "stream": True}
            request = urllib.request.Request(url, json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            sent = time.perf_counter()
            first, text = None, 0
            with urllib.request.urlopen(request, timeout=300) as answer:
                for line in answer:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    piece = "".join(c.get("text", "") for c in chunk.get("choices", []))
                    if piece and first is None:
                        first = time.perf_counter() - sent
                    text += len(piece.encode())
            with lock:
                total[0] += text
                if first is not None:
                    firsts.append(first)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    return {"clients": clients, "bytes_per_s": total[0] / elapsed,
            "ttfb_p50_s": percentile(firsts, 50), "ttfb_p99_s": percentile(firsts, 99)}


def served(run: str | Path, logs: Path, name: str, *args: str) -> Server:
    return start_server(Path(str(run).removeprefix("file://")), logs / f"{name}.log", *args)


def with_server(run: str | Path, logs: Path, name: str, args: tuple[str, ...],
                work: Callable[[Server], Any]) -> Any:
    server = served(run, logs, name, *args)
    try:
        return work(server)
    finally:
        stop_server(server)


def row(figure: str, value: float, unit: str, against: str = "", target: str = "",
        met: bool | None = None) -> dict[str, Any]:
    verdict = "info" if met is None else ("met" if met else "not met")
    return {"figure": figure, "value": float(value), "unit": unit, "against": against,
            "target": target, "verdict": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True,
                        help="a finished image run (islands run configs/quickstart-image.yaml)")
    parser.add_argument("--text-run", help="a finished text run: adds the text arms")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--steps", type=int, help="Euler steps (default: the run's)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per closed-loop arm")
    parser.add_argument("--duration", type=float, default=20.0, help="per Poisson load")
    parser.add_argument("--samples", type=int, default=3, help="islands sample processes")
    parser.add_argument("--images", type=int, default=16,
                        help="images per request in the many-rows arm")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (no deployments or islands sample arm)")
    args = parser.parse_args()
    levels = (1, 2, 4, 8, 16, 32)
    one_levels, cost_sizes, repeats = (1, 16, 32), (1, 2, 4, 8, 16, 32), 15
    loads = LOADS
    if args.quick:
        loads = (0.8, 1.2)  # one load below capacity, one above
        args.seconds, args.duration, args.samples, levels = 1.5, 2.0, 1, (1, 16)
        one_levels, cost_sizes, repeats = (1, 16), (1, 4, 16), 3
        args.images = 2
    config, _ = open_run(args.run)
    steps = args.steps or config.inference.sample_steps
    body = {"n": 1, "steps": steps, "routing": {"strategy": "top1"}}
    many = {**body, "n": args.images}
    many_seconds = 2.5 * args.seconds  # a request of many images takes longer
    limits = ("--max-inflight", "32", "--max-queue", "64")
    console = Console(width=max(Console().width, 120))
    report: dict[str, Any] = {"run": args.run, "steps": steps, "seconds": args.seconds,
                              "duration": args.duration}
    results: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)

        def main_arms(server: Server) -> None:
            closed_loop(server, 2, min(args.seconds, 2.0), body)  # warm-up: kernels per shape
            sweep = {c: closed_loop(server, c, args.seconds, body) for c in levels}
            report["sweep"] = sweep
            capacity = max(s["images_per_s"] for s in sweep.values())
            report["capacity"] = capacity
            report["poisson"] = {f"{int(100 * f)}%": open_loop(server, f * capacity,
                                                               args.duration, body)
                                 for f in loads}
            report["invariance_uint8"] = invariance_http(server, body, False)
            report["invariance_uint8_deterministic"] = invariance_http(server, body, True)
            report["deterministic"] = closed_loop(server, 16, args.seconds,
                                                  {**body, "deterministic": True})
            report["many_rows"] = closed_loop(server, 16, many_seconds, many)

        with_server(args.run, scratch, "inprocess", limits, main_arms)
        single = one_expert_run(args.run, scratch / "one-expert")

        def one_expert_arms(server: Server) -> None:
            closed_loop(server, 2, min(args.seconds, 2.0), body)
            report["one_expert"] = {c: closed_loop(server, c, args.seconds, body)
                                    for c in one_levels}
            report["one_expert_many_rows"] = closed_loop(server, 16, many_seconds, many)

        with_server(single, scratch, "one-expert", limits, one_expert_arms)
        if not args.quick:  # the two arms that start a third server, or CLI processes
            report["deployments"] = with_server(
                args.run, scratch, "deployments", (*limits, "--layout", "deployments"),
                lambda s: (closed_loop(s, 2, min(args.seconds, 2.0), body),
                           {c: closed_loop(s, c, args.seconds, body) for c in (1, 16)})[1])
            report["islands_sample"] = sample_loop(args.run, steps, args.samples, scratch)
        if args.text_run:
            tokens = 16 if args.quick else 64
            report["text"] = with_server(args.text_run, scratch, "text", limits, lambda s: {
                c: text_arm(s, c, args.seconds, tokens) for c in (1, 16)})
    report["invariance_float"] = invariance_float(args.run, steps)
    report["call_cost"] = cost = call_cost(args.run, cost_sizes, repeats)

    sweep, one = report["sweep"], report["one_expert"]
    for c, s in sweep.items():
        results.append(row(f"sweep C={c} images/s", s["images_per_s"], "img/s",
                           f"p50 {s['p50_s']:.3f}s p99 {s['p99_s']:.3f}s, "
                           f"{s['rows_per_expert_call']:.1f} rows/expert call"))
    ratio = sweep[16]["images_per_s"] / one[16]["images_per_s"]
    results.append(row("top1 C=16 / one expert C=16", ratio, "x",
                       f"one expert {one[16]['images_per_s']:.1f} img/s",
                       f">= {TARGETS['one_expert']}x", ratio >= TARGETS["one_expert"]))
    for c in [c for c in one_levels if c != 16 and c in sweep]:
        ratio = sweep[c]["images_per_s"] / one[c]["images_per_s"]
        results.append(row(f"top1 C={c} / one expert C={c}", ratio, "x",
                           f"one expert {one[c]['images_per_s']:.1f} img/s"))
    top1, alone = report["many_rows"], report["one_expert_many_rows"]
    ratio = top1["images_per_s"] / alone["images_per_s"]
    results.append(row(f"top1 / one expert, C=16 x n={args.images}", ratio, "x",
                       f"{top1['images_per_s']:.1f} vs {alone['images_per_s']:.1f} img/s, "
                       f"{top1['rows_per_expert_call']:.1f} vs "
                       f"{alone['rows_per_expert_call']:.1f} rows/expert call",
                       f">= {TARGETS['one_expert']}x", ratio >= TARGETS["one_expert"]))
    expert_fit = cost["fit"]["expert"]
    results.append(row("expert call fixed cost", 1000 * expert_fit["fixed_s"], "ms",
                       f"+ {1000 * expert_fit['per_row_s']:.2f} ms per row (fit over "
                       f"{', '.join(cost['seconds']['expert'])} rows)"))
    if "router" in cost["fit"]:
        router_fit = cost["fit"]["router"]
        results.append(row("router call fixed cost", 1000 * router_fit["fixed_s"], "ms",
                           f"+ {1000 * router_fit['per_row_s']:.2f} ms per row"))
        for rows in (16, 32, 64, 256):
            results.append(row(f"modelled top1 / one expert, {rows} rows", modelled_ratio(
                cost, rows), "x", f"{cost['experts']} even groups, one call each, router "
                                  f"included"))
    ratio = sweep[16]["images_per_s"] / sweep[1]["images_per_s"]
    results.append(row("C=16 / one at a time", ratio, "x",
                       f"one at a time {sweep[1]['images_per_s']:.1f} img/s",
                       f">= {TARGETS['batching']}x", ratio >= TARGETS["batching"]))
    if "islands_sample" in report:
        loop = report["islands_sample"]["images_per_s"]
        results.append(row("best C / islands sample loop", report["capacity"] / loop, "x",
                           f"islands sample {loop:.2f} img/s"))
    for load, p in report["poisson"].items():
        errors = {k: v for k, v in p["statuses"].items() if k != "200"}
        below = float(load.rstrip("%")) < 100
        met = not errors if below else set(errors) <= {"429"}
        results.append(row(f"poisson {load} achieved", p["achieved_per_s"], "req/s",
                           f"offered {p['offered_per_s']:.1f}, p50 {p['p50_s']:.3f}s "
                           f"p99 {p['p99_s']:.3f}s, errors {errors or 'none'}",
                           "no errors" if below else "only 429", met))
        if load == "80%":
            tail = p["p99_s"] / p["p50_s"]
            results.append(row("poisson 80% p99 / p50", tail, "x", "",
                               f"<= {TARGETS['tail']}x", tail <= TARGETS["tail"]))
    results.append(row("invariance uint8 alone vs 16", report["invariance_uint8"], "levels"))
    results.append(row("invariance uint8 deterministic", report[
        "invariance_uint8_deterministic"], "levels", "", "0", report[
        "invariance_uint8_deterministic"] == 0))
    results.append(row("invariance float alone vs 16", report["invariance_float"], "abs"))
    ratio = report["deterministic"]["images_per_s"] / sweep[16]["images_per_s"]
    results.append(row("deterministic C=16 / normal C=16", ratio, "x",
                       f"{report['deterministic']['images_per_s']:.1f} img/s"))
    for c, d in report.get("deployments", {}).items():
        results.append(row(f"deployments C={c} step s / inprocess", d["step_s"]
                           / sweep[c]["step_s"], "x",
                           f"{1000 * d['step_s']:.1f} ms vs {1000 * sweep[c]['step_s']:.1f} ms"
                           f", {d['images_per_s']:.1f} vs {sweep[c]['images_per_s']:.1f} img/s"))
    for c, t in report.get("text", {}).items():
        results.append(row(f"text C={c} bytes/s", t["bytes_per_s"], "B/s",
                           f"ttfb p50 {t['ttfb_p50_s']:.3f}s p99 {t['ttfb_p99_s']:.3f}s"))
    report["results"] = results

    table = Table(title=f"islands serve, {args.run}: n=1 image, {steps} steps, top1, "
                        f"{args.seconds:g} s per closed-loop arm, {args.duration:g} s per "
                        f"Poisson load")
    for column in ("figure", "value", "against / detail", "target", "verdict"):
        table.add_column(column, justify="right" if column == "value" else "left")
    colours = {"met": "[green]met[/]", "not met": "[red]not met[/]", "info": "info"}
    for r in results:
        table.add_row(r["figure"], f"{r['value']:.3g} {r['unit']}", r["against"], r["target"],
                      colours[r["verdict"]])
    console.print(table)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
