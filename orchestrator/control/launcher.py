"""What the experts controller needs of the machinery that runs attempts on islands.

The controller sees islands only through a Launcher, so a launcher on another mesh than
Ray can take Ray's place without the controller changing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.control.failure_policy import NODE_RESTARTED, lost_island_reason
from orchestrator.state.config import IslandSpec, RunConfig
from runstore.layout import RunLayout
from worker.train import ExpertSpec


class Attempt(Protocol):
    """One attempt of one expert on one island, as the launcher that started it holds it."""

    @property
    def expert(self) -> int: ...

    @property
    def island(self) -> str: ...


class IslandLost(RuntimeError):
    """An attempt ended because its island left (killed, hung past its lease, cut off):
    for the failure policy a lost island, not a crash of the attempt."""

    def __init__(self, island: str) -> None:
        super().__init__(lost_island_reason(island))
        self.island = island


class NodeRestarted(RuntimeError):
    """An attempt's workers died with the node the launcher itself started (the embedded
    Ray), which the launcher then started again: not a crash of the attempt, which starts
    again from its last checkpoint without using a retry."""

    def __init__(self) -> None:
        super().__init__(NODE_RESTARTED)


@dataclass(frozen=True)
class Ended:
    """An attempt that ended: its result (the worker's TrainResult as a dict), or the error
    that ended it (a crash, a cancel, a bad input)."""
    attempt: Attempt
    result: dict[str, Any] | None = None
    error: BaseException | None = None


class Launcher(Protocol):
    def open(self) -> None:
        """Get ready to start attempts (before the first `start`)."""

    def close(self) -> None:
        """Stop every attempt still running and free what `open` took."""

    def island_speeds(self, config: RunConfig, layout: RunLayout,
                      probe: Callable[[str], ExpertSpec]) -> dict[str, float]:
        """Samples per second of one slot of each island, measured there when not given."""
        ...

    def present_islands(self, islands: list[IslandSpec]) -> set[str]:
        """The islands that can run attempts right now."""
        ...

    def carried_over(self, experts: list[int]) -> dict[int, str]:
        """Of these experts, those whose attempt under an earlier driver still runs and can
        go on under this one: the island of each. The controller keeps them there and
        `start` re-establishes the attempt instead of starting another; any other attempt
        of an earlier driver is stopped."""
        ...

    def start(self, spec: ExpertSpec, island: IslandSpec) -> Attempt:
        """Start one attempt of `spec.expert` on `island`; it reports through the board."""
        ...

    def poll(self, timeout: float) -> list[Ended]:
        """Wait up to `timeout` seconds; return the attempts that ended meanwhile."""
        ...

    def cancel(self, attempt: Attempt) -> None:
        """Stop the attempt's workers; `poll` then reports it ended with an error."""

    def progress_rows(self) -> dict[int, dict[str, Any]] | None:
        """The latest metrics row each expert's running attempt reported, or None when
        they cannot be read right now (progress is best effort)."""
        ...


def launcher_for(config: RunConfig, root: str) -> Launcher:
    """The launcher for the run's islands: Ray is the only one so far."""
    # Imported here so that the controller, which imports this module, never loads Ray.
    from orchestrator.control.ray_launcher import RayLauncher

    return RayLauncher(root, config.fault_tolerance.placement_timeout_seconds)
