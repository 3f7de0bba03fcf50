"""`islands cancel RUN`: ask the run's driver to stop. Running experts are stopped, their
checkpoints stay, and `islands resume RUN` continues from them."""

from __future__ import annotations

import time

import typer

from orchestrator.cli.common import ASK_ADDRESS_HELP, console, handles_errors, open_run
from orchestrator.control.submit import asked_address, job_client, read_submission
from orchestrator.state.lease import RunLease
from runstore import storage


@handles_errors
def cancel(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
           wait: float = typer.Option(60.0, help="Seconds to wait for the driver to stop."),
           address: str | None = typer.Option(None, help=ASK_ADDRESS_HELP + " Used only to "
                                              "stop the job when its driver does not stop.")
           ) -> None:
    """Stop a running run cleanly; checkpoints are kept for `islands resume`."""
    config, manifest = open_run(run)
    layout = manifest.layout
    record = read_submission(layout)  # checked before anything is written
    address = asked_address(record, address, run)
    lease = RunLease(layout, config.fault_tolerance.lease_seconds)
    holder = lease.live_holder()
    if not holder:
        console.print(f"no driver is running {config.run!r}: nothing to cancel")
        return
    # The request travels through the run's storage, so it reaches a driver anywhere.
    storage.write_json(layout.cancel_request, {"requested": time.time()})
    deadline = time.time() + wait
    while time.time() < deadline and lease.live_holder():
        time.sleep(0.5)
    if lease.live_holder():
        if record is not None and record.kind == "ray-job" and address is not None:
            # The driver is stuck: stop its job. Checkpoints on storage are kept all the same.
            job_client(address).stop_job(record.job_id)
            console.print(f"driver did not stop in {wait:.0f}s: stopped Ray job "
                          f"{record.job_id}; resume with --force once its lease expires",
                          markup=False, highlight=False)
            return
        if record is not None and record.kind == "ray-job":
            console.print(f"driver did not stop in {wait:.0f}s; {record.not_asked()} to stop "
                          "the job", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        console.print(f"asked pid {holder['pid']} on {holder['host']} to stop; it has not "
                      f"yet after {wait:.0f}s")
        raise typer.Exit(1)
    console.print(f"cancelled {config.run!r}; checkpoints kept: islands resume {run}")
