"""`islands serve RUN`: the finished run's ensemble behind an HTTP endpoint (Ray Serve)."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from orchestrator.cli.common import console, handles_errors
from runstore.errors import InputError, OperationalError

if TYPE_CHECKING:
    from orchestrator.serve.options import ServeOptions

LAYOUT_HELP = ("inprocess: the experts inside the server process, no hop per step (the "
               "default here); deployments: one Serve deployment per expert, pinned to the "
               "island it trained on (the default with --address)")


def wait_ready(url: str, say: Callable[[str], None], limit_s: float = 600.0) -> None:
    """Say once the server answers /readyz; raise when it says it cannot start."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
                body = json.loads(answer.read())
                say(f"ready: {body['up']} of {body['experts']} experts up; try "
                    f"{url}/ in a browser, or {url}/v1/models")
                return
        except urllib.error.HTTPError as err:
            reason = json.loads(err.read() or b"{}").get("reason", "")
            if reason.startswith("failed"):
                raise OperationalError(f"the server did not start: {reason}") from None
        except (OSError, ValueError):
            pass
        time.sleep(0.5)


@handles_errors
def serve(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
          host: str = typer.Option("127.0.0.1", help="Address the HTTP server listens on."),
          port: int = typer.Option(8000, min=1, max=65535, help="HTTP port."),
          layout: str | None = typer.Option(None, help=LAYOUT_HELP),
          max_inflight: int = typer.Option(32, min=1, help="Requests stepped together."),
          max_queue: int = typer.Option(64, min=0, help="Requests waiting for a slot; "
                                        "more are answered 429 with Retry-After."),
          deadline: float = typer.Option(300.0, min=0.01, help="Seconds before a request "
                                         "is answered 504 (a body's `timeout` may ask less)."),
          threads: int = typer.Option(0, min=0, help="torch threads for the experts "
                                      "(0: torch's default)."),
          expert_cpus: float = typer.Option(1.0, min=0.0, help="CPUs per expert deployment."),
          expert_gpus: float = typer.Option(0.0, min=0.0, help="GPUs per expert deployment."),
          address: str | None = typer.Option(None, help="Serve on the Ray cluster whose "
                                             "dashboard is http://HEAD:8265 (a Ray job)."),
          ray_address: str | None = typer.Option(None, hidden=True)) -> None:
    """Serve the ensemble: OpenAI-shaped endpoints, step-level batching, a page at /."""
    from orchestrator.cli.common import open_run
    from orchestrator.serve.options import LAYOUTS, ServeOptions
    from orchestrator.serve.runs import open_finished

    layout = layout or ("deployments" if address or ray_address else "inprocess")
    if layout not in LAYOUTS:
        raise InputError("--layout", f"unknown {layout!r}; expected one of {', '.join(LAYOUTS)}")
    config, manifest = open_run(run)
    root = manifest.layout.root
    from orchestrator.modalities import modality_of

    if modality_of(config).serve_lane is None:
        raise InputError(run, f"{config.data.modality} runs cannot be served yet")
    open_finished(root)  # its experts and router are trained, or a one-line error
    options = ServeOptions(root, host, port, layout, max_inflight, max_queue, deadline,
                           threads, expert_cpus, expert_gpus)
    if address:
        submit_serve(address, options, run)
        return
    from orchestrator.serve.launch import serve_run

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    url = f"http://{host}:{port}"

    try:
        serve_run(options, config, manifest, console.print, ray_address,
                  lambda: wait_ready(url, console.print))
    except KeyboardInterrupt:
        console.print("stopped")


def submit_serve(address: str, options: ServeOptions, run: str) -> None:
    """`islands serve --address`: the server as a Ray job on the cluster, its HTTP proxy on
    the head node."""
    from orchestrator.control.submit import job_env, submit_job

    command = ["serve", options.run, "--layout", options.layout, "--host", "0.0.0.0",
               "--port", str(options.port), "--max-inflight", str(options.max_inflight),
               "--max-queue", str(options.max_queue), "--deadline", str(options.deadline_s),
               "--threads", str(options.threads), "--expert-cpus", str(options.expert_cpus),
               "--expert-gpus", str(options.expert_gpus), "--ray-address", "auto"]
    job = submit_job(address, None, None, command, "serve", job_env())
    head = address.split("://", 1)[1].rsplit(":", 1)[0]
    console.print(f"submitted {job}: the server will answer at http://{head}:{options.port} "
                  f"(islands logs is for runs; `ray job logs {job}` follows this one)")
