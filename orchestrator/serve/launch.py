"""Start the server: Ray (an embedded local one, or the cluster this job runs on), Serve's
HTTP proxy, the ingress application, then one application per expert in the deployments
layout; until interrupted."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve

from orchestrator.control.cluster import ISLAND_PREFIX, island_nodes, island_resource
from orchestrator.serve.options import ServeOptions
from orchestrator.state.config import IslandSpec, RunConfig
from orchestrator.state.manifest import Manifest

PIN = 0.001  # of an island's resource: where the expert lives, not a slot it uses up


def islands_of(manifest: Manifest) -> dict[int, str | None]:
    return {k: manifest.expert(k).get("island") for k in manifest.experts}


def start_ray(options: ServeOptions, manifest: Manifest, ray_address: str | None) -> None:
    if ray_address:  # a job on the cluster: join the Ray it runs on
        ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
        return
    # address="local": a Ray of our own, even when `ray start` runs on this machine. It
    # carries the islands the experts trained on, so pinning works as on a cluster.
    places = {name for name in islands_of(manifest).values() if name}
    experts = len(manifest.experts)
    cpus = max(os.cpu_count() or 1, int(experts * options.expert_cpus) + 1
               if options.layout == "deployments" else 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False,
             resources={f"{ISLAND_PREFIX}{name}": 1.0 for name in places})


def pinning(island: str | None, specs: dict[str, IslandSpec],
            nodes: list[dict[str, Any]]) -> dict[str, object] | None:
    """Ray actor options that put a replica on its island's nodes, as training placed the
    expert there: the island's node labels when its spec has them, else its `island:<name>`
    resource; None when no live node of the island is in this cluster."""
    if not island:
        return None
    spec = specs.get(island, IslandSpec(name=island))
    if not island_nodes(spec, nodes):
        return None
    if spec.node_labels:
        return {"label_selector": dict(spec.node_labels)}
    return {"resources": {island_resource(island): PIN}}


def expert_applications(options: ServeOptions, config: RunConfig, manifest: Manifest,
                        say: Callable[[str], None]) -> list[tuple[str, str, object]]:
    """One application per expert, pinned to the island it trained on when the cluster
    has that island (else anywhere, said once)."""
    from orchestrator.serve.experts import ExpertReplica

    specs = {spec.name: spec for spec in config.islands.pool}
    nodes = ray.nodes()
    apps = []
    for k, island in islands_of(manifest).items():
        actor: dict[str, object] = {"num_cpus": options.expert_cpus,
                                    "num_gpus": options.expert_gpus}
        pin = pinning(island, specs, nodes)
        if pin is None:
            say(f"expert {k}: island {island!r} is not in this cluster; placed anywhere")
        else:
            actor.update(pin)
        deployment = serve.deployment(ExpertReplica, name=f"expert-{k}",
                                      ray_actor_options=actor, max_ongoing_requests=64,
                                      health_check_period_s=2.0)
        threads = options.threads or max(1, int(options.expert_cpus))
        app = deployment.bind(options.run, k, threads, options.expert_gpus)
        apps.append((f"{options.app_name}-expert-{k}", f"expert-{k}", app))
    return apps


def serve_run(options: ServeOptions, config: RunConfig, manifest: Manifest,
              say: Callable[[str], None], ray_address: str | None = None,
              ready: Callable[[], None] | None = None) -> None:
    """Serve until interrupted; `ready` is called once the applications are submitted (it
    may block until the server answers, and raise to stop it)."""
    from orchestrator.serve.app import EnsembleServer

    start_ray(options, manifest, ray_address)
    try:
        serve.start(http_options={"host": options.host, "port": options.port},
                    proxy_location="HeadOnly")
        apps = (expert_applications(options, config, manifest, say)
                if options.layout == "deployments" else [])
        ingress = EnsembleServer.bind(options, [(name, dep) for name, dep, _ in apps])
        serve.run(ingress, name=options.app_name, route_prefix="/")
        say(f"serving {config.run} ({len(manifest.experts)} experts, layout "
            f"{options.layout}) at http://{options.host}:{options.port}")
        for name, _, app in apps:  # the ingress is up (readyz 503) while these start
            serve._run(app, name=name, route_prefix=None, _blocking=False)
        if ready is not None:
            ready()
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
