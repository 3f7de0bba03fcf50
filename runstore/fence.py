"""The run's fencing token: the epoch in `lease.json`, one more on every new holder of the
lease (orchestrator/state/lease.py writes it). A worker started under epoch N reads it
right before it publishes a checkpoint's `meta.json` or its final weights, and refuses
when it is newer: its driver lost the run, and a newer driver's workers own these paths.
One small read per publish, next to the megabytes it guards.

A worker also stops by itself when its driver is gone (`check_driver`, every few seconds
while it trains): the run was taken over, or the driver's lease was released or has not
been renewed for a whole lease past its expiry (that much room for clocks that differ)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

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


def check_driver(layout: RunLayout, epoch: int | None) -> None:
    """LeaseLost when the driver that started this worker under `epoch` is gone: another
    driver took the run over, or the driver released its lease or stopped renewing it. A
    lease that cannot be read says nothing (storage down is not a dead driver)."""
    if epoch is None:
        return
    try:
        held = storage.read_json(layout.lease)
        current = int(held.get(EPOCH, 0))
    except (FileNotFoundError, ValueError, AttributeError, *storage.TRANSIENT):
        return
    if current > epoch:
        raise LeaseLost(layout.root, f"this worker's driver holds lease epoch {epoch}, and "
                        f"another driver took the run over (epoch {current}): it stops")
    if current < epoch:
        return
    if held.get("released"):
        raise LeaseLost(layout.root, "this worker's driver released the run's lease: the "
                        "driver is gone, and so is this worker")
    try:
        expires, renewed = float(held["expires"]), float(held["renewed"])
    except (KeyError, TypeError, ValueError):
        return
    if time.time() > expires + max(0.0, expires - renewed):
        when = datetime.fromtimestamp(expires, tz=timezone.utc).strftime("%H:%M:%S UTC")
        raise LeaseLost(layout.root, f"this worker's driver stopped renewing the run's lease "
                        f"(expired at {when}): the driver is gone, and so is this worker")
