"""`islands resume RUN [--address ADDR]`: continue a run whose driver stopped, from what is
on storage, the way it was started: a run `islands submit` started in the background here
resumes in the background here; one it submitted as a Ray job resumes as a Ray job at the
--address the user names; any other is driven from this terminal."""

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
from orchestrator.control.submit import job_env, read_submission, resume_local, submit_resume
from orchestrator.state.config import RunConfig
from runstore.errors import InputError
from runstore.layout import RunLayout


@handles_errors
def resume(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
           address: str | None = typer.Option(
               None, help="http://HEAD:8265 submits the resume as a Ray job and returns at "
               "once; a Ray address (HEAD:6379, auto) drives it from here on that cluster. "
               "Default: as the run was submitted (a background driver here, or a Ray "
               "job, which needs this address), else the run's islands.address."),
           force: bool = typer.Option(False, help="Take over the lease of a driver that "
                                      "died (an expired lease)."),
           wait: bool = typer.Option(False, help="Wait until the lease of the driver "
                                     "holding the run expires (showing the time left), then "
                                     "take the run over (a driver here, not a Ray job)."),
           foreground: bool = typer.Option(False, help="Drive the resume from this terminal, "
                                           "however the run was submitted."),
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
    layout = manifest.layout
    config = config.model_copy(update={"storage": stored_under(config, layout, run)})
    record = read_submission(layout)  # checked before anything starts
    if job_address:
        warn_forwarded(forward_env)
        job = submit_resume(layout, config, job_address, env)
        console.print(f"submitted the resume of {config.run!r} as Ray job {job} on "
                      f"{job_address}", highlight=False)
        console.print(layout.root, highlight=False, soft_wrap=True)
        return
    if record is not None and address is None and not foreground:
        if record.kind == "ray-job":  # the recorded dashboard is never contacted unasked
            raise InputError("--address", f"{run} was submitted as Ray job {record.job_id} "
                             f"and resumes as one: add --address {record.address} (as "
                             "submission.json records it), or --foreground to drive it "
                             "from this terminal")
        pid = resume_local(config, layout, force)
        console.print(f"resumed {config.run!r} as background driver pid {pid}, as "
                      "`islands submit` started it", highlight=False)
        console.print(f"watch it:  islands status {layout.root} --watch", highlight=False,
                      soft_wrap=True)
        console.print(f"its logs:  islands logs {layout.root} --follow", highlight=False,
                      soft_wrap=True)
        console.print(layout.root, highlight=False, soft_wrap=True)
        return
    if address:
        config = config.model_copy(update={"islands": config.islands.model_copy(
            update={"address": address})})
    started = time.perf_counter()
    from orchestrator.pipeline import run_pipeline

    run_pipeline(config, console, force=force, wait=wait)
    console.print(f"wall time {time.perf_counter() - started:.1f}s")


def stored_under(config: RunConfig, layout: RunLayout, run: str) -> str:
    """The storage a run directory lies in. The folder must carry the run's name: the
    driver finds the run by it (storage + run), and the manifest, the lease and the
    workers' paths all follow it, so a renamed folder is refused, not half-resumed."""
    parent, folder = layout.root.rsplit("/", 1)
    if folder != config.run:
        raise InputError(run, f"this run directory is named {folder!r} but its config.yaml "
                         f"says run: {config.run!r}; a run resumes only in a folder named "
                         f"after it: rename the folder back to {config.run!r}")
    return parent
