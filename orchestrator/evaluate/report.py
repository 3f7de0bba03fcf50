"""`islands eval`, whatever the modality: the modality's report and pictures, a baseline
run beside it, then report.json, the PNGs and the tables. The modality's own parts come in
through the `Evaluation` it hands over."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from orchestrator.state.config import RunConfig
from orchestrator.state.manifest import Manifest
from runstore import storage
from runstore.errors import InputError

Report = dict[str, Any]
Pictures = dict[str, bytes]


class Evaluation(Protocol):
    """What a modality contributes to `islands eval` (a ModalitySpec is one)."""

    name: str

    def evaluate(self, config: RunConfig, manifest: Manifest) -> tuple[Report, Pictures]: ...
    def attach_baseline(self, report: Report, baseline: Report) -> None: ...
    def report_tables(self, report: Report) -> list[Table]: ...
    def report_png(self, report: Report, pictures: Pictures) -> bytes: ...


def run_eval(config: RunConfig, manifest: Manifest, console: Console, evaluation: Evaluation,
             baseline: Report | None = None) -> tuple[dict[str, str], Report]:
    with console.status("evaluating"):
        report, pictures = evaluation.evaluate(config, manifest)
    if baseline is not None:
        if baseline.get("modality") != report["modality"]:
            raise InputError("--baseline", f"run {baseline['run']!r} is not of the same "
                             "modality")
        evaluation.attach_baseline(report, baseline)
    pictures["report.png"] = evaluation.report_png(report, pictures)
    layout = manifest.layout
    artifacts = {}
    for name, data in pictures.items():
        artifacts[f"eval/{name}"] = storage.write_bytes(storage.join(layout.eval, name), data)
    artifacts["eval/report.json"] = storage.write_json(storage.join(layout.eval, "report.json"),
                                                       report)
    for table in evaluation.report_tables(report):
        console.print(table)
    console.print(f"eval: {storage.join(layout.eval, 'report.json')} and PNGs in {layout.eval}")
    return artifacts, report


def eval_table(report: Report, rows: str, columns: tuple[str, ...]) -> Table:
    """The frame every eval table shares: a title, `what` first, `note` last."""
    table = Table(title=f"islands eval: {report['run']} ({report['clusters']} experts, {rows})")
    for column in ("what", *columns, "note"):
        table.add_column(column, justify="left" if column in ("what", "note") else "right")
    return table


def add_model_rows(table: Table, report: Report, cells: Callable[[Report], list[str]]) -> None:
    """A row per strategy of the ensemble, then the distilled student's where there is one:
    `cells` gives a row's figures, the same for both."""
    for name, row in report["strategies"].items():
        table.add_row(f"ensemble {name}", *cells(row), "")
    student = report.get("distill")
    if student:
        table.add_row("distilled student", *cells(student),
                      distill_note(student, report["train_flops"]["experts"]))


def distill_note(student: Report, expert_flops: float) -> str:
    """The distilled student's row note: how it was trained and what that cost, the
    teacher's forward passes included, against the experts' training."""
    flops = student["train_flops"]
    return (f"{student['steps']} steps on the {student['teacher_routing']} ensemble, "
            f"{flops:.2g} FLOPs ({100 * flops / max(expert_flops, 1):.0f}% of the experts')")
