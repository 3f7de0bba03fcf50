"""The run's fencing token: the epoch in `lease.json`, one more on every new holder of the
lease (orchestrator/state/lease.py writes it). A worker started under epoch N reads it
right before it publishes a checkpoint's `meta.json` or its final weights, and refuses
when it is newer: its driver lost the run, and a newer driver's workers own these paths.
One small read per publish, next to the megabytes it guards."""

from __future__ import annotations

from runstore import storage
from runstore.errors import LeaseLost
from runstore.layout import RunLayout

EPOCH = "epoch"


def current_epoch(layout: RunLayout) -> int:
    """The epoch of the lease on storage; 0 when there is none (or it is unreadable)."""
    try:
        return int(storage.read_json(layout.lease).get(EPOCH, 0))
    except (FileNotFoundError, ValueError, AttributeError):
        return 0


def check_epoch(layout: RunLayout, epoch: int | None, what: str) -> None:
    """Refuse to publish `what` when the run's lease has moved past `epoch` (None: the
    caller runs outside a leased run, as benchmarks do)."""
    if epoch is None:
        return
    current = current_epoch(layout)
    if current > epoch:
        raise LeaseLost(what, f"not published: this worker's driver holds lease epoch "
                        f"{epoch}, and another driver took the run over (epoch {current})")
