"""Island speeds: given in the config, or measured by a short real training run on each
island before placement, and kept in the run directory so a resumed run places alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from orchestrator.control.ray_tasks import placement_options
from orchestrator.state.config import IslandSpec, RunConfig
from orchestrator.state.manifest import CANCEL_CHECK_SECONDS, RunCancelled, check_cancel
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from worker.throughput import measure_throughput
from worker.train import ExpertSpec

CALIBRATION_SECONDS = 600.0


@ray.remote(max_retries=0)
def calibrate_on_island(spec: ExpertSpec, root: str) -> dict[str, Any]:
    return measure_throughput(spec, RunLayout(root))


def island_speeds(config: RunConfig, layout: RunLayout,
                  probe: Callable[[str], ExpertSpec]) -> dict[str, float]:
    """Samples per second of one slot of each island (relative, when the config gives
    speeds). `probe(island)` is the spec of a real expert on that island."""
    specs = config.islands.specs()
    if all(spec.speed is not None for spec in specs):
        return {spec.name: float(spec.speed) for spec in specs}  # type: ignore[arg-type]
    measured: dict[str, Any] = (storage.read_json(layout.calibration)
                                if storage.exists(layout.calibration) else {})
    pending = {spec.name: _start(spec, probe(spec.name), layout) for spec in specs
               if spec.name not in measured}
    deadline = time.monotonic() + CALIBRATION_SECONDS
    for name, ref in pending.items():
        try:
            result = _wait(ref, deadline, layout, list(pending.values()))
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise InputError(f"islands.pool[{name}]", "calibration did not finish in "
                             f"{CALIBRATION_SECONDS:.0f}s: the island has no free slot or is "
                             "far slower than expected; give it a speed") from None
        measured[name] = {**result, "measured": round(time.time(), 3)}
    if pending:
        storage.write_json(layout.calibration, measured)
    # Data parallelism inside the island is taken to scale linearly with its workers.
    return {spec.name: measured[spec.name]["samples_per_s"] * spec.data_parallel
            for spec in specs}


def _wait(ref: ray.ObjectRef, deadline: float, layout: RunLayout,
          every: list[ray.ObjectRef]) -> dict[str, Any]:
    """The calibration's result; on `islands cancel` every calibration is stopped and the
    run with them (RunCancelled)."""
    while not ray.wait([ref], timeout=min(CANCEL_CHECK_SECONDS,
                                          max(0.0, deadline - time.monotonic())))[0]:
        try:
            check_cancel(layout)
        except RunCancelled:
            for other in every:
                ray.cancel(other, force=True)
            raise
        if time.monotonic() >= deadline:
            raise ray.exceptions.GetTimeoutError(f"calibration past {CALIBRATION_SECONDS} s")
    return ray.get(ref)


def _start(island: IslandSpec, spec: ExpertSpec, layout: RunLayout) -> ray.ObjectRef:
    return calibrate_on_island.options(
        num_cpus=spec.threads, num_gpus=1 if island.accelerators else 0,
        name=f"calibrate-{island.name}", **placement_options(island, 1.0),
    ).remote(spec, layout.root)
