"""scripts/replicate_cbtm.py end to end at its smallest (--quick), in this process: the JSON
it writes holds every arm with every snapshot point scored, every comparison, and every
verdict, and the PNGs it names exist."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def test_the_cbtm_protocol_reports_every_arm_point_and_verdict(ray_session, tmp_path,
                                                               load_script):
    script = load_script("replicate_cbtm")
    out = tmp_path / "cbtm.json"
    # The four-language fortunes: the twelve-language default takes longer to write out.
    script.main(["--quick", "--data", "builtin:fortunes", "--storage",
                 f"file://{tmp_path / 'runs'}", "--out", str(out)])
    report = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(name))

    assert set(report["arms"]) == {"dense", "kmeans-k2", "random-k2", "btm-k2",
                                   "dense-small-k2"}
    for name, arm in report["arms"].items():
        points = arm["points"]
        assert [point["point"] for point in points] == ["S/16", "S/8", "S/4", "S/2", "S"]
        # Every point of every arm has cost the same training FLOPs as the dense model's.
        for point, dense in zip(points, report["arms"]["dense"]["points"], strict=True):
            assert math.isclose(point["flops"], dense["flops"], rel_tol=1e-9), name
            for kind in ("ema", "raw"):
                for routing in ("top1", "full", "oracle"):
                    value = point["bits_per_byte"][kind][routing]
                    assert math.isfinite(value) and 0 < value < 9, (name, point, kind)
            assert math.isfinite(point["train_loss"]), (name, point["point"])
    # BTM is its seed model (at the full batch) up to S/4, then K experts at B/K.
    btm = report["arms"]["btm-k2"]
    assert [p["experts"] for p in btm["points"]] == [[-1]] * 3 + [[0, 1]] * 2
    assert btm["seed_batch"] == 4 and btm["batch"] == 2
    assert report["arms"]["dense-small-k2"]["points"][-1]["step"] == 32

    gaps = report["gaps"]["k2"]
    for kind in ("ema", "raw"):
        assert set(gaps[kind]) == {
            "kmeans_full_vs_dense", "kmeans_top1_vs_dense", "kmeans_oracle_vs_dense",
            "kmeans_full_vs_dense-small", "btm_full_vs_dense", "random_full_vs_dense",
            "dense-small_full_vs_dense"}
        for comparison in gaps[kind].values():
            assert len(comparison["rows"]) == 5
            assert all(math.isfinite(row["se"]) for row in comparison["rows"])
    # builtin:fortunes carries a language column: per-language figures.
    assert report["per_language"] and report["heldout"]["languages"]
    verdicts = report["verdicts"]
    for kind in ("ema", "raw"):
        assert any(line.startswith(f"[{kind}] best K") for line in verdicts)
        tag = f"[K=2, {kind}]"
        assert any(line.startswith(f"{tag} c-BTM (k-means experts, full mixture) minus dense")
                   for line in verdicts)
        assert any(line.startswith(tag) and "router" in line for line in verdicts)
        assert any(line.startswith(tag) and "small-batch" in line for line in verdicts)
        assert any(line.startswith(f"{tag} BTM") for line in verdicts)
        assert any(line.startswith(tag) and "by language" in line for line in verdicts)
    for picture in report["plots"]:
        assert Path(picture).read_bytes().startswith(b"\x89PNG")
