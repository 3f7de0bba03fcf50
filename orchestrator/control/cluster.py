"""Ray connection: the embedded local Ray with virtual islands, or an existing cluster.

An island is the Ray custom resource `island:<name>`; each unit is one expert slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any

import psutil
import ray

from orchestrator.state.config import IslandSpec, RunConfig
from runstore.errors import InputError, OperationalError

ISLAND_PREFIX = "island:"


def island_resource(name: str) -> str:
    return f"{ISLAND_PREFIX}{name}"


# ray.init's arguments while this process runs a Ray it started itself (no address), so
# that it can start it again when its node dies; None on a cluster.
_embedded: dict[str, Any] | None = None
_restarts = 0  # of the embedded Ray, by this driver process
SESSION_MARK = "ISLANDS_EMBEDDED_RAY"
MAX_RESTARTS = 3


def connect(config: RunConfig) -> bool:
    """Make sure Ray is up; return True when this call started it (and should stop it)."""
    global _embedded
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
    # address="local": a new Ray of our own, even when `ray start` runs on this machine
    # (a bare ray.init() would join that cluster instead).
    options = dict(address="local", num_cpus=max(os.cpu_count() or 1, needed),
                   resources={island_resource(spec.name): float(spec.slots) for spec in specs},
                   include_dashboard=False, logging_level=logging.WARNING,
                   log_to_driver=False)
    _start_embedded(options)
    _embedded = options
    return True


def _start_embedded(options: dict[str, Any]) -> None:
    # Every process of this Ray inherits the mark, so a restart can find its workers
    # after its raylet died (they then belong to no parent of ours).
    os.environ[SESSION_MARK] = uuid.uuid4().hex
    try:
        ray.init(**options)
    except Exception as err:  # whatever kept Ray's processes from starting
        first = next(iter(str(err).splitlines()), "")
        raise OperationalError(f"the embedded Ray did not start: {type(err).__name__}: "
                               f"{first}") from err


def disconnect() -> None:
    """Stop the Ray this process started."""
    global _embedded
    _embedded = None
    ray.shutdown()


def embedded() -> bool:
    """Whether Ray is the one this driver started (no cluster address)."""
    return _embedded is not None and ray.is_initialized()


def own_node_alive() -> bool | None:
    """Whether the driver's own Ray node is alive: False when Ray has marked it dead (its
    raylet killed, or missing its health checks on a busy machine), None when Ray cannot
    say right now."""
    try:
        me = ray.get_runtime_context().get_node_id()
        return any(node["NodeID"] == me and node.get("Alive") for node in ray.nodes())
    except (ray.exceptions.RayError, ConnectionError, TimeoutError):
        return None


def restart_embedded(root: str) -> None:
    """The embedded Ray's node died: stop what is left of it and start it again with the
    same islands, at most MAX_RESTARTS times per driver."""
    global _restarts
    assert _embedded is not None, "only the Ray this driver started is restarted"
    if _restarts >= MAX_RESTARTS:
        raise OperationalError(f"the embedded Ray's node died {_restarts + 1} times; "
                               f"checkpoints kept: `islands resume {root}` continues")
    _restarts += 1
    ray.shutdown()
    _kill_marked(os.environ[SESSION_MARK])
    _start_embedded(_embedded)


def _kill_marked(mark: str) -> None:
    """SIGKILL what is left of the dead Ray: its workers outlive their raylet, and would
    otherwise go on writing the checkpoints of experts that start again."""
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):  # gone meanwhile, or another user's
            if proc.environ().get(SESSION_MARK) == mark:
                proc.kill()


def island_nodes(spec: IslandSpec, nodes: list[dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """The live Ray nodes of an island: those holding its resource, or matching its labels."""
    found = []
    for node in ray.nodes() if nodes is None else nodes:
        if not node.get("Alive"):
            continue
        if spec.node_labels:
            labels = node.get("Labels") or {}
            if all(labels.get(key) == value for key, value in spec.node_labels.items()):
                found.append(node)
        elif node.get("Resources", {}).get(island_resource(spec.name), 0) > 0:
            found.append(node)
    return found


def present_islands(specs: list[IslandSpec]) -> set[str]:
    """Islands with at least one live node in the cluster right now."""
    nodes = ray.nodes()
    return {spec.name for spec in specs if island_nodes(spec, nodes)}


def how_to_add(spec: IslandSpec) -> str:
    if spec.node_labels:
        labels = ",".join(f"{k}={v}" for k, v in spec.node_labels.items())
        return f"ray start --address HEAD:6379 --labels {labels}"
    return f"ray start --address HEAD:6379 --resources '{{\"{island_resource(spec.name)}\": " \
           f"{spec.slots}}}'"


def check_islands(specs: tuple[IslandSpec, ...]) -> None:
    """Refuse to start when an island the config names is absent from the cluster."""
    present = present_islands(list(specs))
    missing = [spec for spec in specs if spec.name not in present]
    if missing:
        raise InputError("islands.pool", f"island(s) {', '.join(s.name for s in missing)} not "
                         f"in the Ray cluster (present: {', '.join(sorted(present)) or 'none'}); "
                         f"add a node with: {how_to_add(missing[0])}")


def _amount(value: float) -> str:
    return f"{value:g}"


def shortfall(spec: IslandSpec, bundles: list[dict[str, float]]) -> str:
    """What the island lacks to hold these bundles (a gang's placement group): resources
    its live nodes do not have in total, or not on any one node for one bundle; or, when
    they have it all, that other work holds it."""
    nodes = island_nodes(spec)
    if not nodes:
        return f"island {spec.name} has no live node"
    total: dict[str, float] = {}
    largest: dict[str, float] = {}
    for node in nodes:
        for key, value in node.get("Resources", {}).items():
            total[key] = total.get(key, 0.0) + value
            largest[key] = max(largest.get(key, 0.0), value)
    lacks = []
    for key in sorted({key for bundle in bundles for key in bundle}):
        need = sum(bundle.get(key, 0.0) for bundle in bundles)
        one = max(bundle.get(key, 0.0) for bundle in bundles)
        if total.get(key, 0.0) < need:
            lacks.append(f"{key} {_amount(need)} (its nodes have "
                         f"{_amount(total.get(key, 0.0))})")
        elif largest.get(key, 0.0) < one:
            lacks.append(f"{key} {_amount(one)} on one node (its largest has "
                         f"{_amount(largest.get(key, 0.0))})")
    if lacks:
        return f"island {spec.name} lacks {', '.join(lacks)}"
    free = ray.available_resources()
    keys = sorted({key for bundle in bundles for key in bundle})
    return (f"island {spec.name} has the resources but other work holds them (free in the "
            f"cluster: {', '.join(f'{key} {_amount(free.get(key, 0.0))}' for key in keys)})")
