"""The experts controller: a state machine over experts and their attempts.

An expert is queued, then starting and running on an island, then done, pending a retry
or failed. The controller reaches islands only through a Launcher and decides about an
attempt that ended unfinished only through the FailurePolicy; it never loads Ray, so
another launcher can take Ray's place. Expert -1 is the Branch-Train-Merge seed model."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from orchestrator.control.display import ExpertsDisplay
from orchestrator.control.expert_specs import (
    ExpertRecipe,
    branch_overrides,
    expert_spec,
    expert_steps,
    seed_overrides,
)
from orchestrator.control.failure_policy import (
    CANCELLED,
    DRIVER_STOPPED,
    FINISHED,
    Cause,
    EndedAttempt,
    FailureDecision,
    FailurePolicy,
    cause_of,
    crash_reason,
    input_error_reason,
    lost_island_reason,
    unfit_island,
    unfit_island_reason,
)
from orchestrator.control.launcher import (
    Attempt,
    Ended,
    IslandLost,
    Launcher,
    NodeRestarted,
    launcher_for,
)
from orchestrator.control.placement import (
    ExpertWork,
    Island,
    move_off_lost_island,
    place,
    schedule,
)
from orchestrator.state.config import RunConfig
from orchestrator.state.manifest import Manifest, RunCancelled, now
from runstore import storage
from runstore.errors import InputError, OperationalError
from worker.train import ExpertSpec

RETRY = (FailureDecision.RESTART, FailureDecision.MOVE)


class IslandsGone(OperationalError):
    """No island was left to run the queued experts for `island_wait_seconds`: the driver
    stops; its checkpoints stay for `islands resume`."""


class ExpertsController:
    """Places the given unfinished experts on islands, starts each when its island has a free
    slot, and drives it to done or failed."""

    def __init__(self, config: RunConfig, manifest: Manifest, experts: list[int],
                 recipe: ExpertRecipe, launcher: Launcher, policy: FailurePolicy,
                 overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.recipe = recipe
        self.manifest = manifest
        self.launcher = launcher
        self.policy = policy
        self.overrides = dict(overrides or {})
        self.sizes = manifest.stage("partition")["stats"]["sizes"]
        done = manifest.experts_done(experts)
        self.todo = [k for k in experts if k not in done]
        for expert in self.todo:
            entry = manifest.expert(expert)
            if entry["attempts"] and "ended" not in entry["attempts"][-1]:  # its driver died
                self.end_unfinished(expert, Cause.DRIVER_STOPPED, DRIVER_STOPPED,
                                    entry["attempts"][-1].get("reported_step", entry["step"]))
        per_expert = expert_steps(config, self.sizes)
        fixed = self.overrides.pop("steps", None)  # the seed model's own step count
        self.steps = {k: fixed or per_expert[k] for k in self.todo}
        self.islands = {spec.name: spec for spec in config.islands.specs()}
        self.capacity: list[Island] = []  # each island's slots and speed, once planned
        self.placement: dict[int, str] = {}
        self.stranded: float | None = None  # since when queued experts have had no island
        self.queue: list[int] = []  # longest first, started as slots free up
        self.running: dict[int, Attempt] = {}
        self.lost: dict[int, str] = {}  # attempts cancelled because their island left
        self.unfit: dict[int, set[str]] = {}  # islands an expert's input refused, by expert
        self.present = set(self.islands)
        self.checked = time.monotonic()
        self.display = ExpertsDisplay()

    def rows(self, expert: int) -> int:
        return self.sizes[expert] if expert >= 0 else sum(self.sizes)

    def spec(self, expert: int, island: str, **extra: Any) -> ExpertSpec:
        return expert_spec(self.config, self.manifest.layout, expert, self.islands[island],
                           self.recipe, **{**self.overrides, "steps": self.steps[expert],
                                           "epoch": self.manifest.epoch, **extra})

    def plan(self) -> None:
        """Island speeds (given, or calibrated on each island), then longest-first placement
        of the work: steps x batch samples, each a model forward and backward."""
        probe = self.todo[0]
        speeds = self.launcher.island_speeds(self.config, self.manifest.layout,
                                             lambda island: self.spec(probe, island))
        self.capacity = [Island(name, speeds[name], spec.slots)
                         for name, spec in self.islands.items()]
        work = [ExpertWork(k, self.rows(k), self.steps[k], self.config.experts.batch_size)
                for k in self.todo]
        self.placement = place(work, self.capacity)
        # Attempts of an earlier driver that still run stay where they are, and go first.
        carried = self.launcher.carried_over(self.todo)
        self.placement.update(carried)
        times = schedule(work, self.capacity, self.placement)
        self.queue = sorted(self.todo, key=lambda k: (k not in carried, times[k][0], k))
        for expert in self.todo:
            entry = self.manifest.expert(expert)
            entry.update(island=self.placement[expert], total=self.steps[expert],
                         planned_finish=round(times[expert][1], 3))
            self.display.add(expert, self.placement[expert], self.steps[expert], entry["step"])
        self.manifest.data["placement"] = {"speeds": speeds, "planned_makespan": round(
            max(finish for _, finish in times.values()), 3)}
        self.manifest.save()

    def busy(self, island: str) -> int:
        return sum(1 for attempt in self.running.values() if attempt.island == island)

    def move(self, expert: int) -> str | None:
        """The expert's island left the cluster: place it anew, counting what already runs
        or waits on each island. None while no island is present."""
        load = {name: self.busy(name) + sum(1 for k in self.queue if self.placement[k] == name)
                for name in self.present}
        fit = self.present - self.unfit.get(expert, set())
        island = move_off_lost_island(self.capacity, fit, load)
        if island is None:
            return None
        self.placement[expert] = island
        self.manifest.expert(expert)["island"] = island
        self.display.moved(expert, island)
        return island

    def pump(self) -> None:
        """Start queued experts, longest first, on islands with a free slot. With no island
        present, they wait for one, up to `fault_tolerance.island_wait_seconds`."""
        if self.queue and not self.present:
            self.stranded = self.stranded or time.monotonic()
            waited = time.monotonic() - self.stranded
            if waited > self.config.fault_tolerance.island_wait_seconds:
                raise IslandsGone(
                    f"no island present for {waited:.0f} s to train experts "
                    f"{sorted(self.queue)}; checkpoints kept: `islands resume "
                    f"{self.manifest.layout.root}` continues once islands are back")
            return
        self.stranded = None
        for expert in list(self.queue):
            island = self.placement[expert]
            if island not in self.present or island in self.unfit.get(expert, ()):
                island = self.move(expert)
                if island is None:
                    return
            if self.busy(island) < self.islands[island].slots:
                self.queue.remove(expert)
                self.start(expert, island)

    def start(self, expert: int, island: str) -> None:
        attempt = len(self.manifest.expert(expert)["attempts"]) + 1
        spec = self.spec(expert, island, attempt=attempt)
        self.running[expert] = self.launcher.start(spec, self.islands[island])
        # An attempt the launcher re-established (its earlier lease still held) goes on.
        carried = bool(getattr(self.running[expert], "carried_over", False))
        self.manifest.start_attempt(expert, island, carried_over=carried)
        self.display.starting(expert)

    def watch(self) -> None:
        """Every poll: stop if this driver lost the run's lease. Every 2 s: stop if the user
        asked to cancel; cancel attempts on an island that left (they would wait forever),
        so they end and are relaunched elsewhere."""
        self.manifest.check_lease()  # a driver that lost the run stops within a poll
        if time.monotonic() - self.checked < 2.0:
            return
        self.checked = time.monotonic()
        if storage.exists(self.manifest.layout.cancel_request):
            self.stop_for_cancel()
        self.present = self.launcher.present_islands(list(self.islands.values()))
        for expert, attempt in list(self.running.items()):
            if attempt.island not in self.present and expert not in self.lost:
                self.launcher.cancel(attempt)
                self.lost[expert] = lost_island_reason(attempt.island)

    def stop_for_cancel(self) -> None:
        for expert, attempt in self.running.items():
            self.launcher.cancel(attempt)
            entry = self.manifest.expert(expert)
            step = entry["attempts"][-1].get("reported_step", entry["step"])
            self.end_unfinished(expert, Cause.CANCELLED, CANCELLED, step)
        self.running.clear()
        self.manifest.flush()
        raise RunCancelled(self.manifest.layout.root)

    def run(self, console: Console) -> None:
        if not self.todo:
            return
        self.launcher.open()
        self.plan()
        try:
            with self.display.live(console):
                self.pump()
                while self.running or self.queue:
                    ended = self.launcher.poll(timeout=0.5)
                    rows = self.launcher.progress_rows()
                    if rows is not None:
                        self.show(rows)
                    for end in ended:
                        if self.running.get(end.attempt.expert) is end.attempt:
                            self.collect(end)
                    self.watch()
                    self.pump()
                    self.manifest.save_due()  # events of this poll, within SAVE_SECONDS
        finally:
            self.launcher.close()
        self.manifest.flush()  # the last events, before the stage records its end
        failed = [k for k in self.todo if self.manifest.expert(k)["state"] != "done"]
        if failed:
            raise RuntimeError(f"experts {failed} failed after all retries; see manifest.json")

    def show(self, rows: dict[int, dict[str, Any]]) -> None:
        for expert, row in rows.items():
            entry = self.manifest.expert(expert)
            if expert not in self.steps or entry["state"] != "running":
                continue
            if row["attempt"] != len(entry["attempts"]):
                continue  # the last report of an attempt that already ended
            entry["attempts"][-1].update(
                resumed_from=row["resumed_from"], reported_step=row["step"],
                host=row.get("host"), micro_batch=row.get("micro_batch"),
                accumulation=row.get("accumulation"), workers=row.get("world"))
            entry.update(step=row["step"], loss=row["loss"],
                         samples_per_s=row["samples_per_s"], updated=now())
            self.display.reported(expert, row["step"], row["loss"], row["samples_per_s"])
        if rows:  # live steps for `islands status`, written with the events
            self.manifest.save_soon()

    def collect(self, end: Ended) -> None:
        expert = end.attempt.expert
        del self.running[expert]
        if end.error is not None:
            self.failed(expert, end.error)
            return
        assert end.result is not None
        self.lost.pop(expert, None)
        result = end.result
        self.manifest.expert(expert)["attempts"][-1]["resumed_from"] = result["resumed_from"]
        self.manifest.end_attempt(expert, "done", FINISHED, result["steps"],
                                  cause=Cause.FINISHED.value,
                                  artifacts=result["artifacts"],
                                  samples_seen=result["samples_seen"],
                                  train_flops=result["train_flops"],
                                  final_loss=result["final_loss"],
                                  resumed_from=result["resumed_from"])
        self.display.done(expert, result["steps"], result["final_loss"])

    def failed(self, expert: int, error: BaseException) -> None:
        """The attempt ended unfinished: record why, and retry it, fail it, or stop the run
        as the policy decides."""
        entry = self.manifest.expert(expert)
        attempts = len(entry["attempts"])
        island = entry["attempts"][-1]["island"]
        if isinstance(error, InputError) and unfit_island(error.where) == island:
            # Too little memory there, say: another island of the pool may do.
            self.unfit.setdefault(expert, set()).add(island)
            if self.present - self.unfit[expert]:
                reason = unfit_island_reason(island, error)
                self.end_unfinished(expert, Cause.UNFIT_ISLAND, reason, entry["step"])
                self.display.failed(expert, attempts, reason)
                self.queue.insert(0, expert)   # `pump` moves it off the unfit island
                return
        if isinstance(error, InputError):  # bad data, or no island of the pool can run it
            self.end_unfinished(expert, Cause.INPUT_ERROR, input_error_reason(error),
                                entry["step"])
            raise InputError(error.where, error.problem) from None
        lost = self.lost.pop(expert, None)
        if lost is None and isinstance(error, IslandLost):  # the launcher saw it leave first
            lost = lost_island_reason(error.island)
        if isinstance(error, NodeRestarted):  # the islands are back; no retry used
            cause, reason = Cause.LOST_NODE, str(error)
        elif lost:
            cause, reason = Cause.LOST_ISLAND, lost
        else:
            cause, reason = Cause.CRASH, crash_reason(error)
        # The step the attempt last reported: its progress up to there is at risk.
        step = entry["attempts"][-1].get("reported_step", entry["step"])
        decision = self.end_unfinished(expert, cause, reason, step)
        self.display.failed(expert, attempts, reason)
        if decision is FailureDecision.ABORT_RUN:   # fault_tolerance.on_expert_failure: abort
            for other, attempt in list(self.running.items()):
                self.launcher.cancel(attempt)
                step = self.manifest.expert(other)["attempts"][-1].get(
                    "reported_step", self.manifest.expert(other)["step"])
                self.end_unfinished(other, Cause.CANCELLED, CANCELLED, step)
            self.running.clear()
            self.manifest.flush()
            raise RuntimeError(f"expert {expert} failed after all retries ({reason}); "
                               "fault_tolerance.on_expert_failure: abort stopped the run")
        if decision in RETRY:  # a move happens in `pump`, once the island is seen gone
            if cause is Cause.CRASH:  # no tight crash loop; a lost island moves at once
                time.sleep(min(2.0**attempts, 10.0))
            self.present = self.launcher.present_islands(list(self.islands.values()))
            self.queue.insert(0, expert)  # first in line for a slot

    def end_unfinished(self, expert: int, cause: Cause, reason: str,
                       step: int) -> FailureDecision:
        """End the expert's last attempt for `cause`: cancelled when the run was stopped
        (as its stage then reads), pending when the policy retries it, failed when not."""
        attempts = self.manifest.expert(expert)["attempts"]
        earlier = [Cause(attempt["cause"]) if "cause" in attempt else cause_of(attempt["reason"])
                   for attempt in attempts[:-1] if "reason" in attempt]
        decision = self.policy.decide(EndedAttempt(cause, earlier))
        # A cancelled expert uses no retry, and resume starts every expert not done.
        state = ("cancelled" if cause is Cause.CANCELLED
                 else "pending" if decision in RETRY else "failed")
        self.manifest.end_attempt(expert, state, reason, step, cause=cause.value)
        return decision


def _controller(config: RunConfig, manifest: Manifest, experts: list[int],
                recipe: ExpertRecipe, overrides: dict[str, Any],
                launcher: Launcher | None) -> ExpertsController:
    return ExpertsController(config, manifest, experts, recipe,
                             launcher or launcher_for(config, manifest.layout.root),
                             FailurePolicy(config.fault_tolerance.max_retries,
                                           config.fault_tolerance.on_expert_failure == "abort"),
                             overrides)


def run_experts(config: RunConfig, manifest: Manifest, console: Console,
                recipe: ExpertRecipe, launcher: Launcher | None = None) -> None:
    """`launcher`: where attempts run; None: Ray (`launcher_for`)."""
    _controller(config, manifest, manifest.experts, recipe,
                branch_overrides(manifest), launcher).run(console)


def run_seed(config: RunConfig, manifest: Manifest, console: Console,
             recipe: ExpertRecipe, launcher: Launcher | None = None) -> None:
    _controller(config, manifest, [-1], recipe,
                seed_overrides(config, config.clusters), launcher).run(console)
