"""`islands eval RUN [--baseline RUN]`: write eval/report.json and PNGs, print the table."""

from __future__ import annotations

import typer

from orchestrator.cli.common import console, handles_errors, open_run
from orchestrator.state.lease import RunLease
from runstore import storage


@handles_errors
def evaluate(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
             baseline: str | None = typer.Option(None, help="A monolith run to compare with."),
             ) -> None:
    """Evaluate strategies, experts and router; compare with a baseline run if given."""
    from orchestrator.evaluate.report import run_eval
    from orchestrator.modalities import modality_of

    config, manifest = open_run(run)
    baseline_report = None
    if baseline:
        base_config, base_manifest = open_run(baseline)
        report_url = storage.join(base_manifest.layout.eval, "report.json")
        if base_manifest.stage_done("eval"):
            baseline_report = storage.read_json(report_url)
        else:
            _, baseline_report = run_eval(base_config, base_manifest, console,
                                          modality_of(base_config))
    # Eval writes the manifest: hold the lease, so a live driver is never overwritten.
    with RunLease(manifest.layout, config.fault_tolerance.lease_seconds) as lease:
        manifest.fence(lease)
        artifacts, _ = run_eval(config, manifest, console, modality_of(config),
                                baseline_report)
        manifest.finish_stage("eval", artifacts)
