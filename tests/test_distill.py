"""`islands distill` on the tiny trained runs (tests/conftest.py), each distilled in a copy:
the stage and its verified artifacts, a student nearer its teacher than before training,
the student sampled, generated and scored, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.distill.stage import DistillOptions, distill
from orchestrator.ensemble.experts import load_student
from orchestrator.state.run_config import open_run_dir
from worker.models import build_model
from worker.objectives import make_objective

runner = CliRunner()
STEPS = 20  # the tiny configs checkpoint every 10 steps: one checkpoint before the end


def copied(runs: dict[str, Path], modality: str, where: Path) -> Path:
    run = where / f"{modality}-run"
    shutil.copytree(runs[modality], run)
    return run


def distilled(serving_runs, tmp_path_factory, modality: str) -> Path:
    run = copied(serving_runs, modality, tmp_path_factory.mktemp("distill"))
    result = runner.invoke(app, ["distill", str(run), "--steps", str(STEPS)])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def distilled_image(serving_runs, tmp_path_factory) -> Path:
    return distilled(serving_runs, tmp_path_factory, "image")


@pytest.fixture(scope="module")
def distilled_text(serving_runs, tmp_path_factory) -> Path:
    return distilled(serving_runs, tmp_path_factory, "text")


def teacher_gap(run: Path, student: torch.nn.Module) -> float:
    """The distillation loss of `student` on held-out rows the student never trained on:
    squared velocity error (images) or KL from the mixture in nats per byte (text)."""
    _, manifest = open_run_dir(str(run))
    meta = json.loads(manifest.read_verified("distill/meta.json"))
    layout = manifest.layout
    kwargs = {"run": layout.root, "strategy": meta["teacher"]["strategy"],
              "top_k": meta["teacher"]["top_k"]}
    if "context" in meta:
        kwargs["context"] = meta["context"]
    name = "distill_lm" if "context" in meta else "distill_flow"
    objective = make_objective(name, [layout.shard(k, "heldout") for k in manifest.experts],
                               **kwargs)
    batch = objective.batch(torch.arange(min(objective.rows, 48)),
                            torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float(objective.loss_sum(student, batch)) / objective.units(batch)


def test_image_distill_writes_a_verified_stage_and_the_student_nears_its_teacher(
        distilled_image):
    check_stage_and_teacher_gap(distilled_image)


def test_text_distill_writes_a_verified_stage_and_the_student_nears_its_teacher(
        distilled_text):
    check_stage_and_teacher_gap(distilled_text)


def check_stage_and_teacher_gap(run: Path) -> None:
    _, manifest = open_run_dir(str(run))
    stage = manifest.stage("distill")
    assert manifest.stage_done("distill") and stage["steps"] == STEPS
    assert {"distill/model.safetensors", "distill/meta.json"} <= set(stage["artifacts"])
    student, meta = load_student(manifest)
    expert = json.loads(manifest.read_verified("experts/expert-0/final/meta.json"))
    assert (meta["model"], meta["model_kwargs"]) == (expert["model"], expert["model_kwargs"])
    assert meta["teacher"]["strategy"] == "full"
    # The teacher's forward passes (both experts, every sample) are part of the cost.
    assert meta["train_flops"] == meta["student_train_flops"] + meta["teacher_flops"]
    assert meta["teacher_flops"] > meta["student_train_flops"] / 3
    assert (run / "distill" / "checkpoints" / f"step-{STEPS:08d}" / "meta.json").exists()
    torch.manual_seed(0)
    untrained = build_model(meta["model"], **meta["model_kwargs"]).eval()
    before, after = teacher_gap(run, untrained), teacher_gap(run, student)
    assert after < 0.8 * before, (before, after)


def test_sample_and_eval_use_the_image_student(distilled_image, tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", str(distilled_image), "--model", "distill",
                                 "--n", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "distilled student" in result.output and out.read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["eval", str(distilled_image)])
    assert result.exit_code == 0, result.output
    assert "distilled" in result.output  # the table's row (wrapped at 80 columns)
    report = json.loads((distilled_image / "eval" / "report.json").read_text())
    row, top1 = report["distill"], report["strategies"]["top1"]
    # One model call per denoising step: the inference cost of top1.
    assert row["expert_calls_per_sample"] == top1["expert_calls_per_sample"] == \
        row["sample_steps"]
    assert 0 < row["heldout_loss"] < 10 and row["steps"] == STEPS
    assert (distilled_image / "eval" / "samples-distill.png").exists()


def test_generate_and_eval_use_the_text_student(distilled_text):
    result = runner.invoke(app, ["generate", str(distilled_text), "--model", "distill",
                                 "--prompt", "The ", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("The ") and "routing" not in result.output
    result = runner.invoke(app, ["eval", str(distilled_text)])
    assert result.exit_code == 0, result.output
    report = json.loads((distilled_text / "eval" / "report.json").read_text())
    row = report["distill"]
    assert row["expert_calls_per_text"] == 1.0 and 0 < row["bits_per_byte"] < 9


class Killed(Exception):
    pass


def test_a_killed_distill_resumes_from_its_checkpoint_to_the_same_bytes(
        distilled_image, serving_runs, tmp_path):
    run = copied(serving_runs, "image", tmp_path)
    config, manifest = open_run_dir(str(run))
    options = DistillOptions(steps=STEPS)

    def kill_after_first_checkpoint(row: dict) -> None:
        if row["step"] == 15:
            raise Killed

    with pytest.raises(Killed):
        distill(config, manifest, options, Console(quiet=True), kill_after_first_checkpoint)
    assert not (run / "distill" / "model.safetensors").exists()
    config, manifest = open_run_dir(str(run))
    distill(config, manifest, options, Console(quiet=True))
    assert manifest.stage("distill")["resumed_from"] == 10
    weights = "distill/model.safetensors"
    assert (run / weights).read_bytes() == (distilled_image / weights).read_bytes()


def test_bad_input_is_one_line_and_exit_2(serving_runs, tmp_path):
    # A run nobody distilled has no distill stage in its manifest (eval looked for one).
    assert "distill" not in json.loads((serving_runs["text"] / "manifest.json").read_text())[
        "stages"]
    text = copied(serving_runs, "text", tmp_path)
    result = runner.invoke(app, ["distill", str(text), "--width", "33"])
    assert result.exit_code == 2 and "--width" in result.output and "heads" in result.output
    result = runner.invoke(app, ["distill", str(text), "--routing", "best"])
    assert result.exit_code == 2 and "--routing" in result.output
    result = runner.invoke(app, ["generate", str(text), "--model", "distill", "--prompt", "x"])
    assert result.exit_code == 2 and "islands distill" in result.output
    manifest = text / "manifest.json"
    data = json.loads(manifest.read_text())
    data["stages"]["experts"]["state"] = "running"
    manifest.write_text(json.dumps(data))
    result = runner.invoke(app, ["distill", str(text)])
    assert result.exit_code == 2 and "experts stage is running" in result.output
    assert "Traceback" not in result.output and not (text / "distill").exists()
