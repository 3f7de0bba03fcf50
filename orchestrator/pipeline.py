"""`islands run`: partition -> seed -> experts -> router -> eval, each stage skipped when
the manifest says it is done and its artifacts still hash to what was recorded.

A stage's libraries (scikit-learn for the partition, torch for the experts, Ray for the
islands) are imported when the stage runs, so the start of a run that is already complete
(`islands resume` of a finished run) takes a second, not the seconds of their imports."""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

from orchestrator.evaluate.curves import write_loss_curves
from orchestrator.evaluate.report import run_eval
from orchestrator.mesh.extra import require_libp2p
from orchestrator.modalities import check_config, modality_of
from orchestrator.state.config import RunConfig
from orchestrator.state.lease import RunLease
from orchestrator.state.manifest import STAGES, Manifest, RunCancelled, now
from orchestrator.state.run_config import freeze_config, layout_for, resolve_storage
from runstore import storage
from runstore.errors import InputError

if TYPE_CHECKING:
    from partitioner.centroids import KMeansSpec
    from partitioner.request import PartitionRequest


def partition_request(config: RunConfig) -> PartitionRequest:
    from partitioner.request import PartitionRequest

    data, part = config.data, config.partition
    modality = modality_of(config)
    return PartitionRequest(
        source=data.source, storage=resolve_storage(config.storage),
        image_column=data.image_column, label_column=data.label_column,
        heldout_fraction=data.heldout_fraction, max_rows=data.max_rows,
        sample_rows=data.sample_rows, clusters=config.clusters, features=modality.features(config),
        pca_components=part.pca_components, balance=part.balance, balance_eps=part.balance_eps,
        kmeans_init=part.kmeans_init, kmeans_iters=part.kmeans_iters, seed=config.seed,
        read_rows=modality.read_rows, modality=modality.name, text_column=data.text_column,
        kmeans=kmeans_spec(config), method=part.method, model_path=part.model_path,
        split=data.split, channels=data.channels, image_size=data.image_size,
        resize=data.resize, text_unit=data.text_unit,
        ray_address=config.islands.address)


def kmeans_spec(config: RunConfig) -> KMeansSpec:
    """k-means fitted on a sample of training rows (flat, or hierarchical as in DDM)."""
    from partitioner.centroids import KMeansSpec
    from partitioner.stage import FIT_ROWS

    part = config.partition
    return KMeansSpec(clusters=config.clusters, iters=part.kmeans_iters, seed=config.seed,
                      n_init=part.kmeans_init, sample_rows=part.fit_rows or FIT_ROWS,
                      backend=part.kmeans_backend, fine_clusters=part.fine_clusters)


def stage_partition(config: RunConfig, manifest: Manifest, console: Console) -> None:
    from partitioner.stage import run_partition

    manifest.start_stage("partition")
    with console.status("partitioning: features, k-means, shards"):
        artifacts = run_partition(partition_request(config), manifest.layout)
    stats = storage.read_json(manifest.layout.partition_stats)
    # Before the stage counts as done, so that the config can still be fixed.
    modality_of(config).check_partition(config, manifest.layout, stats)
    manifest.finish_stage("partition", artifacts, stats=stats)
    console.print(f"partition: {stats['clusters']} clusters, sizes {stats['sizes']}, "
                  f"balance {stats['balance_ratio']:.3f}, inertia {stats['inertia']:.1f}, "
                  f"between-cluster variance {stats['between_cluster_variance']:.3f}")


def _on_islands(config: RunConfig, manifest: Manifest, console: Console, runner: Any) -> None:
    stats = manifest.stage("partition")["stats"]
    modality = modality_of(config)
    # Again for a run partitioned before a check existed: stopped here, before Ray starts.
    modality.check_partition(config, manifest.layout, stats)
    recipe = modality.expert_recipe(config, stats)
    if config.islands.launcher == "mesh":  # island agents over the mesh; no Ray here
        require_libp2p()
        from orchestrator.mesh.launcher import MeshLauncher

        runner(config, manifest, console, recipe, MeshLauncher(config, manifest.layout,
                                                               console))
        return
    from orchestrator.control.cluster import check_islands, connect, disconnect

    started_ray = connect(config)
    try:
        check_islands(config.islands.specs())
        runner(config, manifest, console, recipe)
    finally:
        if started_ray:
            disconnect()


def check_shared_storage(config: RunConfig) -> None:
    """Experts run in Ray worker processes: storage must be visible outside this one."""
    if config.storage.startswith("memory://"):
        raise InputError("storage", "memory:// lives inside one process and Ray workers "
                         "cannot see it; use a path, file://, or an object store URL")


def stage_seed(config: RunConfig, manifest: Manifest, console: Console) -> None:
    manifest.start_stage("seed")
    if config.experts.seed_steps == 0 or config.clusters == 1:
        manifest.finish_stage("seed", {}, skipped="no Branch-Train-Merge seed model")
        return
    from orchestrator.control.controller import run_seed

    _on_islands(config, manifest, console, run_seed)
    manifest.finish_stage("seed", manifest.expert(-1)["artifacts"])
    console.print(f"seed: {config.experts.seed_steps} steps on all data; experts branch from it")


def stage_experts(config: RunConfig, manifest: Manifest, console: Console) -> None:
    from orchestrator.control.controller import run_experts

    manifest.start_stage("experts")
    try:
        _on_islands(config, manifest, console, run_experts)
    finally:  # curves so far, also for a cancelled or failed run
        seed = [-1] if str(-1) in manifest.data["experts"] else []
        curves = write_loss_curves(manifest.layout, seed + manifest.experts)
    artifacts = {}
    for k in manifest.experts:
        artifacts.update(manifest.expert(k)["artifacts"])
    manifest.finish_stage("experts", artifacts)
    if curves:
        console.print(f"loss curves: {curves}")


def stage_router(config: RunConfig, manifest: Manifest, console: Console) -> None:
    manifest.start_stage("router")
    if config.clusters == 1:
        manifest.finish_stage("router", {}, skipped="one expert needs no router")
        console.print("router: skipped (one expert)")
        return
    artifacts, fields = modality_of(config).build_router(config, manifest, console)
    manifest.finish_stage("router", artifacts, **fields)
    _report_router_share(fields.get("train_flops"), manifest, console)


# DDM's router costs about 4% of training FLOPs; far above that, router.steps was not
# scaled down with the experts' compute.
ROUTER_SHARE_WARNING = 0.25


def _report_router_share(router_flops: float | None, manifest: Manifest,
                         console: Console) -> None:
    """Print the router's share of the run's training FLOPs; warn when it is large."""
    experts = [manifest.expert(k).get("train_flops") for k in manifest.data["experts"]
               if k.lstrip("-").isdigit()]
    if not router_flops or not experts or None in experts:
        return
    share = router_flops / (router_flops + sum(experts))
    line = f"router: {share:.1%} of training FLOPs"
    if share > ROUTER_SHARE_WARNING:
        line += (f" [yellow](more than {ROUTER_SHARE_WARNING:.0%}: router.steps is large "
                 "for these experts; lower it when scaling a config down)[/]")
    console.print(line)


def stage_eval(config: RunConfig, manifest: Manifest, console: Console) -> None:
    manifest.start_stage("eval")
    artifacts, _ = run_eval(config, manifest, console, modality_of(config))
    manifest.finish_stage("eval", artifacts)


STAGE_RUNNERS: dict[str, Any] = {
    "partition": stage_partition,
    "seed": stage_seed,
    "experts": stage_experts,
    "router": stage_router,
    "eval": stage_eval,
}


def run_pipeline(config: RunConfig, console: Console, until: str = "eval",
                 force: bool = False, wait: bool = False) -> Manifest:
    """Run (or resume) every stage up to `until`, holding the run's lease throughout.
    `wait`: wait out the lease of a driver that holds the run, then take it over."""
    check_config(config)  # a modality it cannot train is refused before anything is written
    config = config.model_copy(update={"storage": resolve_storage(config.storage)})
    layout = layout_for(config)
    stages = STAGES[: STAGES.index(until) + 1]
    if "seed" in stages:
        check_shared_storage(config)
    verified: set[str] = set()  # hashing artifacts is the slow part: do it once per start
    if storage.exists(layout.manifest):
        manifest = Manifest.load(layout)
        verified = {name for name in stages if manifest.stage_done(name)}
        if verified == set(stages):
            freeze_config(config, layout)  # still refuse a config that disagrees
            console.print(f"run {config.run!r} is already complete at {layout.root}: "
                          "nothing to do")
            return manifest
    lease = RunLease(layout, config.fault_tolerance.lease_seconds, force,
                     on_lost=_interrupt_main(),
                     wait=(lambda line: console.print(line, highlight=False, soft_wrap=True))
                     if wait else None)
    try:
        with lease:
            if lease.took_over:
                console.print(lease.took_over, highlight=False, soft_wrap=True)
            storage.remove(layout.cancel_request)  # a cancel was for the driver before us
            freeze_config(config, layout)
            manifest = Manifest.open(layout, config.run, config.clusters,
                                     seed_model=config.experts.seed_steps > 0
                                     and config.clusters > 1, lease=lease)
            _run_stages(config, manifest, stages, console, verified)
    except KeyboardInterrupt:
        if lease.lost is None:
            raise
        raise lease.lost_error() from None
    if until == STAGES[-1]:
        console.print(f"[bold green]run {config.run!r} complete[/]: {layout.root}")
    else:
        console.print(f"run {config.run!r} done up to the {until} stage at {layout.root} "
                      "(`islands run` on its config goes on from there)")
    return manifest


def _interrupt_main() -> Callable[[], None] | None:
    """How a lost lease stops this driver at once, whatever stage it is in: an interrupt
    of the main thread, where the CLI runs the stages (a driver in another thread stops
    at its next manifest write or controller poll)."""
    if threading.current_thread() is threading.main_thread():
        return _thread.interrupt_main
    return None


def _run_stages(config: RunConfig, manifest: Manifest, stages: tuple[str, ...],
                console: Console, verified: set[str]) -> None:
    for name in stages:
        if name in verified or manifest.stage_done(name):
            console.print(f"{name}: done (verified), skipping")
            continue
        try:
            manifest.check_cancel(at_once=True)  # stages that cannot stop halfway stop here
            STAGE_RUNNERS[name](config, manifest, console)
        except RunCancelled:
            manifest.stage(name).update(state="cancelled", finished=now())
            manifest.save()
            raise
        except BaseException as err:
            manifest.fail_stage(name, f"{type(err).__name__}: {err}")
            raise
