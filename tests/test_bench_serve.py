"""scripts/bench_serve.py --quick on the tiny digits run: its arms run against real servers
and every figure it reports is a number with a verdict (times are never asserted). The
deployments layout it leaves out is tested in tests/test_serve.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_serve_quick_reports_every_figure(serving_runs, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_serve.py"), "--run",
         str(serving_runs["image"]), "--quick", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    figures = {r["figure"]: r for r in report["results"]}
    for name in ("top1 C=16 / one expert C=16", "C=16 / one at a time",
                 "poisson 80% p99 / p50",
                 "invariance uint8 deterministic", "invariance float alone vs 16",
                 "deterministic C=16 / normal C=16",
                 "top1 / one expert, C=16 x n=2", "expert call fixed cost",
                 "modelled top1 / one expert, 256 rows"):
        assert name in figures, sorted(figures)
    for figure in report["results"]:
        assert isinstance(figure["value"], float) and math.isfinite(figure["value"]), figure
        assert figure["verdict"] in ("met", "not met", "info"), figure
        assert (figure["verdict"] == "info") == (figure["target"] == ""), figure
    # A request batched with 15 others in deterministic mode is the same bytes as alone.
    assert figures["invariance uint8 deterministic"]["verdict"] == "met"
    # The one-expert copy really served one expert: its step calls one expert on every row.
    assert report["one_expert"]["16"]["rows_per_expert_call"] > 1
    # Requests of 2 images fill twice the rows per step of requests of one.
    assert (report["one_expert_many_rows"]["rows_per_expert_call"]
            > report["one_expert"]["16"]["rows_per_expert_call"])
    # The call-cost model: more rows in a step, a larger share of it spent on rows.
    fit = report["call_cost"]["fit"]["expert"]
    assert fit["fixed_s"] > 0 and fit["per_row_s"] > 0, fit
