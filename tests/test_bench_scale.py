"""scripts/bench_scale.py end to end at its smallest, in this process: every figure it
reports is a number, with its target and verdict, in the JSON it writes. Without its
partition part: writing a dataset and partitioning it take 11 s of CPU in their own
processes (imports, mostly), and the full run of the script measures them."""

from __future__ import annotations

import json
import math
import sys


def test_the_scale_benchmark_reports_every_figure(tmp_path, monkeypatch, capsys, load_script):
    bench = load_script("bench_scale")
    out = tmp_path / "scale.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_scale.py", "--partition-rows", "", "--experts", "8", "--islands", "4",
        "--expert-seconds", "0.5", "--lost-experts", "2", "--status-runs", "1",
        "--resume-runs", "1", "--skip-s3", "--json", str(out)])
    bench.main()
    assert "islands at scale" in capsys.readouterr().out  # the table
    figures = json.loads(out.read_text())["figures"]
    names = [figure["name"] for figure in figures]
    for expected in ("driver CPU per expert-hour, 8 experts / 4 islands",
                     "storage writes/s, 8 experts / 4 islands", "islands status, 8 experts",
                     "islands status 8 / 4 experts",
                     "islands resume of a finished 8-expert run, local"):
        assert expected in names, names
    assert any(name.startswith("lost island's experts all restarted") for name in names)
    for figure in figures:
        assert isinstance(figure["value"], int | float) and math.isfinite(figure["value"]), \
            figure
        assert figure["met"] in (True, False, None) and figure["target"], figure
        assert (figure["met"] is None) == (figure["target"] == "-"), figure
