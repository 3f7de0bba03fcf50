"""`islands distill RUN`: train one student on the finished ensemble's outputs."""

from __future__ import annotations

import typer

from orchestrator.cli.common import console, handles_errors, open_run
from orchestrator.state.lease import RunLease


@handles_errors
def distill(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
            steps: int | None = typer.Option(None, min=1, help="Student training steps "
                                             "(default: experts.steps)."),
            batch_size: int | None = typer.Option(None, min=1, help="Default: "
                                                  "experts.batch_size."),
            lr: float | None = typer.Option(None,
                                            help="Peak learning rate (default: experts.lr)."),
            seed: int | None = typer.Option(None, help="Default: the run's seed."),
            threads: int | None = typer.Option(None, min=1, help="Torch threads (default: "
                                               "experts.threads)."),
            width: int | None = typer.Option(None, min=1, help="The student's width (U-Net "
                                             "channels, byte LM width); default: the "
                                             "experts'."),
            routing: str = typer.Option("full", help="How the teacher routes: top1, topk "
                                        "or full."),
            top_k: int | None = typer.Option(None, min=1, help="Experts kept by topk "
                                             "(default: inference.top_k)."),
            ) -> None:
    """Distil the ensemble into one model of the experts' architecture: it learns the
    ensemble's output (images: velocity; text: next-byte mixture) on the training shards.
    Resumes from distill/checkpoints/ when killed."""
    from orchestrator.distill.stage import DistillOptions
    from orchestrator.distill.stage import distill as run_distill

    config, manifest = open_run(run)
    options = DistillOptions(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                             threads=threads, width=width, routing=routing, top_k=top_k)
    # The stage writes the manifest: hold the lease, so a live driver is never overwritten.
    with RunLease(manifest.layout, config.fault_tolerance.lease_seconds) as lease:
        manifest.fence(lease)
        run_distill(config, manifest, options, console)
