"""`islands resume RUN [--address ADDR]`: continue a run whose driver stopped, from what is
on storage: here, on a Ray cluster, or as a Ray job (an http:// dashboard address)."""

from __future__ import annotations

import time

import typer

from orchestrator.cli.common import (
    FORWARD_ENV_HELP,
    console,
    handles_errors,
    open_run,
    warn_forwarded,
)
from orchestrator.control.submit import job_env, submit_resume
from orchestrator.pipeline import run_pipeline
from runstore.errors import InputError
from runstore.storage import join


@handles_errors
def resume(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
           address: str | None = typer.Option(
               None, help="http://HEAD:8265 submits the resume as a Ray job and returns at "
               "once; a Ray address (HEAD:6379, auto) drives it from here on that cluster. "
               "Default: the run's islands.address."),
           force: bool = typer.Option(False, help="Take over the lease of a driver that "
                                      "died (an expired lease)."),
           wait: bool = typer.Option(False, help="Wait until the lease of the driver "
                                     "holding the run expires (showing the time left), then "
                                     "take the run over (a driver here, not a Ray job)."),
           forward_env: list[str] = typer.Option(
               [], "--forward-env", metavar="NAME", help=FORWARD_ENV_HELP + " Only with an "
               "http:// --address.")) -> None:
    """Verify finished stages and experts (sha256), skip them, continue the rest from their
    last good checkpoints."""
    job_address = address if address and address.startswith(("http://", "https://")) else None
    if forward_env and not job_address:
        raise InputError("--forward-env", "only a Ray job (--address http://HEAD:8265) needs "
                         "it: a driver here uses this environment")
    env = job_env(forward_env)
    config, manifest = open_run(run)
    parent = manifest.layout.root.rsplit("/", 1)[0]
    config = config.model_copy(update={"storage": parent})
    assert join(parent, config.run) == manifest.layout.root, "run folder is named after the run"
    if job_address:
        warn_forwarded(forward_env)
        job = submit_resume(manifest.layout, config, job_address, env)
        console.print(f"submitted the resume of {config.run!r} as Ray job {job} on "
                      f"{job_address}", highlight=False)
        console.print(manifest.layout.root, highlight=False, soft_wrap=True)
        return
    if address:
        config = config.model_copy(update={"islands": config.islands.model_copy(
            update={"address": address})})
    started = time.perf_counter()
    run_pipeline(config, console, force=force, wait=wait)
    console.print(f"wall time {time.perf_counter() - started:.1f}s")
