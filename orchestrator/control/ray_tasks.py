"""One expert's attempt on Ray: a single Ray task, or a gang of data-parallel workers.

Islands never talk to each other. Inside an island, an expert with several workers trains
with torch DDP over one process group (gloo on CPUs, NCCL on GPUs); the workers are
gang-scheduled in a placement group on the island's nodes, and worker 0 publishes the
rendezvous address through the run's progress board.
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as dist
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.control.cluster import island_resource
from orchestrator.state.config import IslandSpec
from runstore.layout import RunLayout
from worker.train import ExpertSpec, train_expert

RENDEZVOUS_SECONDS = 120.0


@ray.remote(max_retries=0)
def train_on_island(spec: ExpertSpec, root: str, board: Any) -> dict[str, Any]:
    """One worker. The driver handles retries itself so every attempt and its reason land
    in the manifest."""
    result = train_expert(spec, RunLayout(root), progress=lambda row: board.report.remote(row))
    return asdict(result)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@ray.remote(max_retries=0)
def train_rank(spec: ExpertSpec, root: str, board: Any, rank: int, world: int,
               key: str) -> dict[str, Any]:
    """Worker `rank` of an expert's data-parallel gang on one island."""
    if rank == 0:
        host = ray.util.get_node_ip_address()
        address = f"{host}:{_free_port(host)}"
        ray.get(board.publish.remote(key, address))
    else:
        deadline = time.monotonic() + RENDEZVOUS_SECONDS
        while (address := ray.get(board.lookup.remote(key))) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker 0 of {key} never published its address")
            time.sleep(0.2)
    backend = "gloo" if spec.device == "cpu" else "nccl"
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=5))
    try:
        progress = (lambda row: board.report.remote(row)) if rank == 0 else None
        result = train_expert(spec, RunLayout(root), progress=progress,
                              log=print if rank == 0 else lambda _: None)
    finally:
        dist.destroy_process_group()
    return asdict(result)


def placement_options(island: IslandSpec, share: float) -> dict[str, Any]:
    """What a worker asks of Ray so it lands on the island: a share of one of its slots
    (custom resource `island:<name>`) or its node labels, and its accelerator type."""
    resources: dict[str, float] = {}
    options: dict[str, Any] = {}
    if island.node_labels:
        options["label_selector"] = dict(island.node_labels)
    else:
        resources[island_resource(island.name)] = share
    if island.accelerators:
        resources[f"accelerator_type:{island.accelerators.type}"] = 0.001
    options["resources"] = resources
    return options


@dataclass(eq=False)
class RayAttempt:
    """One attempt of one expert: its workers' results, and the gang's placement group
    (its bundles, and when it was asked for, until Ray has scheduled it)."""
    expert: int
    island: str
    refs: list[ray.ObjectRef]
    group: PlacementGroup | None = None
    done: dict[int, dict[str, Any]] = field(default_factory=dict)  # rank -> result
    bundles: list[dict[str, float]] = field(default_factory=list)
    asked: float = field(default_factory=time.monotonic)
    placed: bool = False

    def waits_for_placement(self) -> bool:
        """Whether the gang's placement group is still unscheduled (checked with the GCS
        until it is scheduled once)."""
        if self.group is None or self.placed:
            return False
        self.placed = placement_group_table(self.group).get("state") == "CREATED"
        return not self.placed

    def pending(self) -> list[ray.ObjectRef]:
        """The workers still to collect. A collected one must leave the driver's wait list:
        ray.wait would keep returning it first and never show its gang-mates ending."""
        return [ref for rank, ref in enumerate(self.refs) if rank not in self.done]

    def cancel(self) -> None:
        for ref in self.refs:
            ray.cancel(ref, force=True)
        self.release()

    def release(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def start_on_ray(spec: ExpertSpec, island: IslandSpec, root: str, board: Any) -> RayAttempt:
    world = island.data_parallel
    gpus = 1 if island.accelerators else 0
    if world == 1:
        options = placement_options(island, 1.0)
        ref = train_on_island.options(num_cpus=spec.threads, num_gpus=gpus,
                                      name=f"expert-{spec.expert}", **options
                                      ).remote(spec, root, board)
        return RayAttempt(spec.expert, island.name, [ref])
    options = placement_options(island, 1.0 / world)
    bundle = {"CPU": float(spec.threads), **options["resources"]}
    if gpus:
        bundle["GPU"] = 1.0
    # PACK: the workers share nodes where they can; the island's nodes are close together.
    group = placement_group([bundle] * world, strategy="PACK",
                            bundle_label_selector=[options["label_selector"]] * world
                            if "label_selector" in options else None)
    key = f"{root}#expert-{spec.expert}#attempt-{spec.attempt}"
    refs = [train_rank.options(
        num_cpus=spec.threads, num_gpus=gpus, name=f"expert-{spec.expert}-rank-{rank}",
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, rank),
    ).remote(spec, root, board, rank, world, key) for rank in range(world)]
    return RayAttempt(spec.expert, island.name, refs, group, bundles=[bundle] * world)
