"""The Launcher on Ray: an attempt is a Ray task or a DDP gang (ray_tasks.py), an island is
the Ray nodes holding its resource or labels, and workers report live progress to a
ProgressBoard actor on the driver's node."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.control import calibrate, cluster
from orchestrator.control.launcher import Attempt, Ended, NodeRestarted
from orchestrator.control.ray_tasks import RayAttempt, start_on_ray
from orchestrator.state.config import IslandSpec, RunConfig
from runstore.errors import InputError
from runstore.layout import RunLayout
from worker.train import ExpertSpec


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest metrics row per expert; reports are fire-and-forget so training never waits."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.addresses: dict[str, str] = {}  # data-parallel rendezvous, per expert attempt

    def report(self, row: dict[str, Any]) -> None:
        self.rows[row["expert"]] = row

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return self.rows

    def publish(self, key: str, address: str) -> None:
        self.addresses[key] = address

    def lookup(self, key: str) -> str | None:
        return self.addresses.get(key)


def _raised(error: Exception) -> Exception:
    """What the worker itself raised, when it raised: its type and message make the
    attempt's reason ("FloatingPointError: non-finite loss at step 7"), where Ray's wrapper
    would open with the task's name and pid."""
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, Exception):
        return error.cause
    return error


# What a task raises when the node it ran on died (or the driver's own raylet did).
NODE_DIED = (ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError)


class RayLauncher:
    """`placement_timeout`: seconds a gang's placement group may stay unscheduled before
    its attempt fails as unfit for the island (see `unplaced`)."""

    def __init__(self, root: str, placement_timeout: float = 300.0) -> None:
        self.root = root
        self.placement_timeout = placement_timeout
        self.board: Any = None
        self.live: list[RayAttempt] = []  # started, not yet reported ended by `poll`
        self.islands: dict[str, IslandSpec] = {}  # the islands attempts were started on
        self.restarted: list[RayAttempt] = []  # ended by a restart, told by the next poll
        self.unsure = False  # the last check could not tell whether the node was alive
        self.seen: set[str] | None = None  # the islands present at the last good check

    def open(self) -> None:
        # Pinned to the driver's node: an island's node may vanish, the driver's may not.
        self.board = ProgressBoard.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()

    def close(self) -> None:
        for attempt in self.live:
            attempt.cancel()
        self.live.clear()
        if self.board is not None:
            ray.kill(self.board)
            self.board = None

    def island_speeds(self, config: RunConfig, layout: RunLayout,
                      probe: Callable[[str], ExpertSpec]) -> dict[str, float]:
        return calibrate.island_speeds(config, layout, probe)

    def present_islands(self, islands: list[IslandSpec]) -> set[str]:
        """The islands with a live node. The embedded Ray is the driver's own: when its node
        died, it is started again here and the attempts it ran end as `NodeRestarted`."""
        if cluster.embedded():
            alive = cluster.own_node_alive()
            # Ray that cannot say twice in a row is as good as dead.
            if alive is False or (alive is None and self.unsure):
                self.restart()
                alive = True
            self.unsure = alive is None
        try:
            present = cluster.present_islands(islands)
        except (ray.exceptions.RayError, ConnectionError, TimeoutError):
            # Once is a hiccup: the islands seen last. Twice: none is usable, their
            # attempts move, and with none back the driver stops (IslandsGone).
            present, self.seen = (self.seen or set()), None
            return present
        self.seen = present
        return present

    def restart(self) -> None:
        # The workers died with the node: nothing is left to cancel, and the old session's
        # handles must not be used again.
        ended, self.live, self.board = self.live, [], None
        cluster.restart_embedded(self.root)
        self.open()
        self.restarted.extend(ended)

    def take_restarted(self) -> list[Ended]:
        ended = [Ended(attempt, error=NodeRestarted()) for attempt in self.restarted]
        self.restarted.clear()
        return ended

    def carried_over(self, experts: list[int]) -> dict[int, str]:
        return {}  # a driver's Ray workers die with it

    def start(self, spec: ExpertSpec, island: IslandSpec) -> RayAttempt:
        attempt = start_on_ray(spec, island, self.root, self.board)
        self.islands[island.name] = island
        self.live.append(attempt)
        return attempt

    def poll(self, timeout: float) -> list[Ended]:
        """Collect at most one worker: a failure ends its whole attempt, which is done when
        all its workers are."""
        if self.restarted:
            return self.take_restarted()
        unplaced = self.unplaced()
        if unplaced:
            return unplaced
        refs = {ref: attempt for attempt in self.live for ref in attempt.pending()}
        if not refs:
            time.sleep(timeout)
            return []
        try:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
        except ray.exceptions.RaySystemError:
            if not cluster.embedded():
                raise  # the cluster's trouble: one line from the CLI, resume continues
            self.restart()
            return self.take_restarted()
        ended: list[Ended] = []
        for ref in ready:
            attempt = refs[ref]
            try:
                attempt.done[attempt.refs.index(ref)] = ray.get(ref)
            except Exception as err:  # worker died, OOM, node lost, a bug, bad input
                if cluster.embedded() and isinstance(_raised(err), NODE_DIED):
                    # The embedded Ray's one node is the driver's own: every attempt died
                    # with it. (On a cluster, a dead node's attempt is a crash unless its
                    # island is seen gone first; see ExpertsController.watch.)
                    self.restart()
                    return self.take_restarted()
                attempt.cancel()  # the rest of a gang would wait forever
                self.live.remove(attempt)
                ended.append(Ended(attempt, error=_raised(err)))
                continue
            if len(attempt.done) == len(attempt.refs):
                attempt.release()
                self.live.remove(attempt)
                ended.append(Ended(attempt, result=attempt.done[0]))
        return ended

    def unplaced(self) -> list[Ended]:
        """Gangs whose placement group Ray has not scheduled within `placement_timeout`:
        the island lacks what they ask for (or other work holds it). Each fails as an
        InputError about its island, so the expert moves to another island that fits."""
        ended = []
        for attempt in list(self.live):
            if (not attempt.waits_for_placement()
                    or time.monotonic() - attempt.asked < self.placement_timeout):
                continue
            demand = ", ".join(f"{key}: {value:g}" for key, value in attempt.bundles[0].items())
            problem = (f"the placement group of its {len(attempt.bundles)} data-parallel "
                       f"workers ({{{demand}}} each) was not scheduled within "
                       f"{self.placement_timeout:g} s: "
                       f"{cluster.shortfall(self.islands[attempt.island], attempt.bundles)}")
            attempt.cancel()
            self.live.remove(attempt)
            ended.append(Ended(attempt, error=InputError(f"islands.pool[{attempt.island}]",
                                                         problem)))
        return ended

    def cancel(self, attempt: Attempt) -> None:
        if not isinstance(attempt, RayAttempt):
            raise TypeError(f"not an attempt on Ray: {attempt!r}")
        attempt.cancel()

    def progress_rows(self) -> dict[int, dict[str, Any]] | None:
        # Progress is best effort; results come from the tasks themselves.
        if self.board is None:
            return None
        with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
            return ray.get(self.board.snapshot.remote(), timeout=10)
        return None
