"""`islands submit FILE [--address http://HEAD:8265] [--forward-env NAME]`: start a run and
return at once."""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.cli.common import FORWARD_ENV_HELP, console, handles_errors, warn_forwarded
from orchestrator.control.submit import job_env, submit_run
from orchestrator.state.config import load_config
from runstore.errors import InputError


@handles_errors
def submit(config_file: Path = typer.Argument(..., help="Run config (YAML)."),
           address: str | None = typer.Option(
               None, help="The Ray cluster's dashboard URL, http://HEAD:8265 (job submission "
               "API). Without it, a driver starts in the background here on the embedded "
               "local Ray."),
           forward_env: list[str] = typer.Option(
               [], "--forward-env", metavar="NAME", help=FORWARD_ENV_HELP)) -> None:
    """Submit a run (or the continuation of one with the same config) and print its run
    directory, the id every other verb takes."""
    from orchestrator.modalities import check_config

    config = load_config(config_file)
    check_config(config)  # refused here, not in the background or on the cluster
    if forward_env and not address:
        raise InputError("--forward-env", "only a Ray job (--address http://HEAD:8265) needs "
                         "it: a background driver here inherits this environment")
    env = job_env(forward_env)
    warn_forwarded(forward_env)
    layout, job = submit_run(config, address, env)
    where = f"Ray job {job} on {address}" if address else f"background driver pid {job}"
    # status and logs ask a Ray dashboard only when named: the hints name it.
    ask = f" --address {address}" if address else ""
    console.print(f"submitted {config.run!r} as {where}", highlight=False)
    console.print(f"watch it:  islands status {layout.root} --watch{ask}", highlight=False,
                  soft_wrap=True)
    console.print(f"its logs:  islands logs {layout.root} --follow{ask}", highlight=False,
                  soft_wrap=True)
    console.print(layout.root, highlight=False, soft_wrap=True)
