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
from runstore import storage
from runstore.errors import InputError

FINISHED = ("SUCCEEDED", "FAILED", "STOPPED", "exited")


def follow_text(read: Callable[[], str], done: Callable[[], bool], interval: float) -> None:
    """Print what `read` returns as it grows, until `done` and nothing new is left."""
    shown = 0
    while True:
        ended = done()  # ask first: what was written before the end is still read below
        text = read()
        if len(text) > shown:
            console.out(text[shown:], end="", highlight=False)
            shown = len(text)
        if ended:
            return
        time.sleep(interval)


def latest_driver(data: bytes, offset: int) -> str:
    """The part of a background driver's log written by the latest driver (a resumed run's
    earlier drivers wrote before `offset`); all of it when the file is shorter than that,
    as when it was replaced."""
    return data[offset if offset <= len(data) else 0:].decode(errors="replace")


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
        url = layout.expert_log(expert)

        def read() -> str:
            return storage.read_bytes(url).decode(errors="replace") \
                if storage.exists(url) else ""

        def expert_done() -> bool:
            state = storage.read_json(layout.manifest)["experts"][str(expert)]["state"]
            return state in ("done", "failed") or driver_done()

        if follow:
            follow_text(read, expert_done, interval)
        else:
            console.out(read() or f"expert {expert} has not logged yet", end="",
                        highlight=False)
        return
    if record is None:
        raise InputError(run, "was not started by `islands submit`: its driver printed to "
                         "the terminal that ran it; try --expert K")
    if record.kind == "local" and record.log is not None:
        log_url = storage.join(layout.root, record.log)  # checked to stay inside the run

        def read() -> str:
            return latest_driver(storage.read_bytes(log_url), record.log_offset) \
                if storage.exists(log_url) else ""
    elif record.kind == "local":
        path = driver_log_file(layout)  # found by rule, not by a path the run names

        def read() -> str:
            return latest_driver(path.read_bytes(), record.log_offset) \
                if path.exists() else ""
    elif address is None:
        raise InputError("--address", record.not_asked())
    else:
        client = job_client(address)
        job_id = record.job_id

        def read() -> str:
            return client.get_job_logs(job_id)
    if follow:
        follow_text(read, driver_done, interval)
    else:
        console.out(read(), end="", highlight=False)
