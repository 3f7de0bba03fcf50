"""`islands logs RUN [--expert K] [--follow]`: the driver's output, or one expert's log."""

from __future__ import annotations

import time
from collections.abc import Callable

import typer

from orchestrator.cli.common import ASK_ADDRESS_HELP, console, handles_errors, open_run
from orchestrator.control.submit import (
    asked_address,
    driver_log_file,
    job_client,
    job_status,
    read_submission,
)
from orchestrator.state.lease import RunLease
from orchestrator.state.manifest import Manifest
from runstore import storage
from runstore.errors import InputError
from runstore.log_parts import FileTail, LogReader

FINISHED = ("SUCCEEDED", "FAILED", "STOPPED", "exited")


def follow_text(new_text: Callable[[], str], done: Callable[[], bool],
                interval: float) -> None:
    """Print what `new_text` returns (only what is new each call), until `done` and
    nothing new is left."""
    while True:
        ended = done()  # ask first: what was written before the end is still read below
        text = new_text()
        if text:
            console.out(text, end="", highlight=False)
        if ended:
            return
        time.sleep(interval)


@handles_errors
def logs(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
         expert: int | None = typer.Option(None, "--expert", "-e", help="One expert's log "
                                           "(every attempt); -1 is the seed model."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the "
                                     "run's driver (or that expert) ends."),
         interval: float = typer.Option(1.0, help="Seconds between polls with --follow."),
         address: str | None = typer.Option(None, help=ASK_ADDRESS_HELP)) -> None:
    """Without --expert: the latest driver's output (the Ray job's logs, asked of --address,
    or its part of driver.log for a background driver). With it: that expert's log from the
    run directory."""
    config, manifest = open_run(run)
    layout = manifest.layout
    record = read_submission(layout)
    address = asked_address(record, address, run)
    lease = RunLease(layout, config.fault_tolerance.lease_seconds)

    def driver_done() -> bool:
        status = job_status(record, address)
        if status is None:  # no submission, or its dashboard not asked: the lease tells
            return lease.live_holder() is None
        return status.split(" ")[0] in FINISHED

    if expert is not None:
        if str(expert) not in manifest.data["experts"]:
            raise InputError("--expert", f"run {config.run!r} has experts "
                             f"{', '.join(manifest.data['experts'])}, not {expert}")
        reader = LogReader(layout.expert_log(expert), layout.legacy_expert_log(expert))

        def expert_done() -> bool:
            state = Manifest.load(layout).expert(expert)["state"]
            return state in ("done", "failed") or driver_done()

        if follow:
            follow_text(reader.new_text, expert_done, interval)
        else:
            console.out(reader.new_text() or f"expert {expert} has not logged yet", end="",
                        highlight=False)
        return
    if record is None:
        raise InputError(run, "was not started by `islands submit`: its driver printed to "
                         "the terminal that ran it; try --expert K")
    new_text: Callable[[], str]
    if record.kind == "local" and record.log is not None:
        # The latest driver's part: earlier drivers of a resumed run wrote before the offset.
        new_text = FileTail(storage.join(layout.root, record.log),  # checked inside the run
                            record.log_offset).new_text
    elif record.kind == "local":
        # Found by rule, not by a path the run names.
        new_text = FileTail(str(driver_log_file(layout)), record.log_offset).new_text
    elif address is None:
        raise InputError("--address", record.not_asked())
    else:
        client = job_client(address)
        job_id = record.job_id
        shown = 0

        def new_text() -> str:  # Ray's job API answers the whole log each time
            nonlocal shown
            text = client.get_job_logs(job_id)
            text, shown = text[shown:], max(shown, len(text))
            return text
    if follow:
        follow_text(new_text, driver_done, interval)
    else:
        console.out(new_text(), end="", highlight=False)
