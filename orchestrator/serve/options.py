"""What `islands serve` is asked for, handed to the ingress and expert deployments."""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("inprocess", "deployments")


@dataclass(frozen=True)
class ServeOptions:
    run: str
    """The run directory's URL (file://... or s3://...)."""
    host: str = "127.0.0.1"
    port: int = 8000
    layout: str = "inprocess"
    """inprocess: experts inside the ingress (no hop per step); deployments: one Serve
    deployment per expert, pinned to the island it trained on."""
    max_inflight: int = 32
    """Requests stepped together; the rest wait in the queue."""
    max_queue: int = 64
    """Requests waiting for a slot; one more is answered 429."""
    deadline_s: float = 300.0
    """A request not answered by then is dropped and answered 504 (a body may ask less)."""
    threads: int = 0
    """torch threads in the process that runs the experts (0: torch's default here)."""
    expert_cpus: float = 1.0
    expert_gpus: float = 0.0
    expert_timeout_s: float = 10.0
    """An expert call not answered by then counts as the expert being down."""
    app_name: str = "islands"
