"""Ray connection: the embedded local Ray with virtual islands, or an existing cluster.

An island is the Ray custom resource `island:<name>`; each unit is one expert slot.
"""

from __future__ import annotations

import logging
import os

import ray

from orchestrator.config import IslandSpec, RunConfig
from runstore.errors import InputError

ISLAND_PREFIX = "island:"


def island_resource(name: str) -> str:
    return f"{ISLAND_PREFIX}{name}"


def connect(config: RunConfig) -> bool:
    """Make sure Ray is up; return True when this call started it (and should stop it)."""
    if ray.is_initialized():
        return False
    specs = config.islands.specs()
    if config.islands.address:
        try:
            ray.init(address=config.islands.address, logging_level=logging.WARNING,
                     log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise InputError("islands.address", f"cannot reach Ray at "
                             f"{config.islands.address} ({err}); with token authentication "
                             "set RAY_AUTH_MODE=token and the head's RAY_AUTH_TOKEN") from None
        return True
    needed = sum(spec.slots for spec in specs) * config.experts.threads
    ray.init(num_cpus=max(os.cpu_count() or 1, needed),
             resources={island_resource(spec.name): float(spec.slots) for spec in specs},
             include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    return True


def present_islands() -> set[str]:
    """Islands with at least one live node in the cluster right now."""
    return {name.removeprefix(ISLAND_PREFIX) for name, amount in ray.cluster_resources().items()
            if name.startswith(ISLAND_PREFIX) and amount > 0}


def check_islands(specs: tuple[IslandSpec, ...]) -> None:
    """Refuse to start when an island the config names is absent from the cluster."""
    offered = ray.cluster_resources()
    missing = [spec.name for spec in specs if offered.get(island_resource(spec.name), 0) <= 0]
    if missing:
        present = sorted(k.removeprefix(ISLAND_PREFIX) for k in offered
                         if k.startswith(ISLAND_PREFIX))
        raise InputError("islands.pool", f"island(s) {', '.join(missing)} not in the Ray "
                         f"cluster (present: {', '.join(present) or 'none'}); start each node "
                         "with --resources '{\"island:<name>\": 1}'")
