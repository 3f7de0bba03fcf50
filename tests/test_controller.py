"""The experts controller (orchestrator/control/controller.py) driven through a scripted
launcher and a fake clock: the manifest's states, attempts and reasons for each way an
attempt ends, without Ray. The real launcher is tested end to end elsewhere
(test_fault_tolerance, test_island_loss, test_data_parallel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from orchestrator.control import controller
from orchestrator.control.controller import ExpertsController, RunCancelled
from orchestrator.control.failure_policy import FailurePolicy
from orchestrator.control.launcher import Ended, NodeRestarted
from orchestrator.state import manifest as manifest_module
from orchestrator.state.config import IslandSpec, parse_config
from orchestrator.state.manifest import Manifest
from runstore import storage
from runstore.errors import InputError
from runstore.layout import RunLayout
from tests.conftest import recipe, tiny_config
from worker.train import ExpertSpec


class Clock:
    """Stands in for the controller's `time`: sleeping only moves the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass(eq=False)
class FakeAttempt:
    expert: int
    island: str
    spec: ExpertSpec
    outcome: str
    cancelled: bool = False


@dataclass
class ScriptedLauncher:
    """Each started attempt ends as `script[expert]` says, in order: "finish", "crash",
    "input" (a bad shard), "lose island" (its island leaves the cluster and the attempt
    hangs until cancelled), "restart node" (its node died and the launcher started it
    again) or "hang" (runs until cancelled)."""
    clock: Clock
    present: set[str]
    script: dict[int, list[str]]
    started: list[FakeAttempt] = field(default_factory=list)
    live: list[FakeAttempt] = field(default_factory=list)
    closed: bool = False

    def open(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def island_speeds(self, config: Any, layout: Any, probe: Any) -> dict[str, float]:
        return {spec.name: float(spec.speed) for spec in config.islands.specs()}

    def present_islands(self, islands: list[IslandSpec]) -> set[str]:
        return {spec.name for spec in islands} & self.present

    def carried_over(self, experts: list[int]) -> dict[int, str]:
        return {}

    def start(self, spec: ExpertSpec, island: IslandSpec) -> FakeAttempt:
        attempt = FakeAttempt(spec.expert, island.name, spec, self.script[spec.expert].pop(0))
        self.started.append(attempt)
        self.live.append(attempt)
        return attempt

    def poll(self, timeout: float) -> list[Ended]:
        self.clock.sleep(timeout)
        ended = [self._end(attempt) for attempt in list(self.live)]
        return [end for end in ended if end is not None]

    def _end(self, attempt: FakeAttempt) -> Ended | None:
        error: BaseException | None = None
        if attempt.cancelled:
            error = RuntimeError("TaskCancelledError: the task was cancelled")
        elif attempt.outcome == "crash":
            error = RuntimeError("worker died\nmore detail")
        elif attempt.outcome == "input":
            error = InputError("shards/0.parquet", "not a parquet file")
        elif attempt.outcome == "unfit":   # the island's memory cannot hold the model
            error = InputError(f"islands.pool[{attempt.island}].memory_gb",
                               "0.1 GB cannot hold the model at micro-batch 1")
        elif attempt.outcome == "lose island":
            self.present.discard(attempt.island)
            return None
        elif attempt.outcome == "restart node":  # the launcher restarted its own node
            error = NodeRestarted()
        elif attempt.outcome == "hang":
            return None
        self.live.remove(attempt)
        if error is not None:
            return Ended(attempt, error=error)
        steps = attempt.spec.steps
        return Ended(attempt, result={"resumed_from": 0, "steps": steps, "artifacts": {},
                                      "samples_seen": steps, "train_flops": 1.0,
                                      "final_loss": 0.25})

    def cancel(self, attempt: FakeAttempt) -> None:
        attempt.cancelled = True

    def progress_rows(self) -> dict[int, dict[str, Any]] | None:
        return {}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(controller, "time", fake)
    return fake


def stage(tmp_path: Path, clock: Clock, script: dict[int, list[str]], max_retries: int,
          islands: tuple[str, ...] = ("a", "b")
          ) -> tuple[ExpertsController, ScriptedLauncher, Manifest]:
    raw = tiny_config(f"file://{tmp_path}/store", run="scripted",
                      islands={"pool": [{"name": name, "speed": 1.0} for name in islands]},
                      fault_tolerance={"max_retries": max_retries})
    config = parse_config(raw)
    layout = RunLayout(f"file://{tmp_path}/store/scripted")
    manifest = Manifest.open(layout, config.run, clusters=len(script))
    manifest.stage("partition")["stats"] = {"sizes": [100] * len(script)}
    launcher = ScriptedLauncher(clock, set(islands), script)
    experts = ExpertsController(config, manifest, list(script), recipe(config), launcher,
                                FailurePolicy(max_retries))
    return experts, launcher, manifest


def reasons(manifest: Manifest, expert: int) -> list[tuple[str, str]]:
    return [(a["island"], a["reason"]) for a in manifest.expert(expert)["attempts"]]


def quiet() -> Console:
    return Console(quiet=True)


def test_a_lost_island_moves_the_expert_without_using_a_retry(tmp_path, clock):
    experts, launcher, manifest = stage(tmp_path, clock, {0: ["lose island", "finish"],
                                                          1: ["finish"]}, max_retries=0)
    experts.run(quiet())
    assert reasons(manifest, 0) == [("a", "island a left the cluster"), ("b", "finished")]
    assert manifest.expert(0)["state"] == "done" and manifest.expert(0)["island"] == "b"
    assert reasons(manifest, 1) == [("b", "finished")]
    assert [attempt.spec.attempt for attempt in launcher.started if attempt.expert == 0] == [1, 2]
    assert clock.slept.count(2.0) == 0  # no crash backoff: a lost island moves at once
    assert launcher.closed


def test_with_no_island_left_the_experts_wait_for_one_then_the_driver_stops(tmp_path, clock):
    experts, launcher, manifest = stage(tmp_path, clock, {0: ["lose island", "finish"]},
                                        max_retries=0, islands=("a",))
    with pytest.raises(controller.IslandsGone, match=r"no island present .* experts \[0\]"):
        experts.run(quiet())
    waited = experts.config.fault_tolerance.island_wait_seconds
    assert clock.now > waited and len(launcher.started) == 1
    assert manifest.expert(0)["state"] == "pending" and launcher.closed
    # An island back in time: the expert starts on it and finishes.
    experts, launcher, manifest = stage(tmp_path / "back", clock, {0: ["lose island",
                                                                       "finish"]},
                                        max_retries=0, islands=("a",))
    returns_at = clock.now + 30.0
    present = launcher.present_islands

    def back(islands: list[IslandSpec]) -> set[str]:
        return {"a"} if clock.now >= returns_at else present(islands)

    launcher.present_islands = back  # type: ignore[method-assign]
    experts.run(quiet())
    assert reasons(manifest, 0) == [("a", "island a left the cluster"), ("a", "finished")]


def test_an_island_unfit_for_an_expert_moves_it_and_only_all_unfit_aborts(tmp_path, clock):
    experts, _, manifest = stage(tmp_path, clock, {0: ["unfit", "finish"],
                                                          1: ["finish"]}, max_retries=0)
    experts.run(quiet())
    first, second = manifest.expert(0)["attempts"]
    assert first["island"] == "a" and first["cause"] == "unfit island"
    assert first["reason"].startswith("island a cannot run it: islands.pool[a].memory_gb")
    assert (second["island"], second["cause"]) == ("b", "finished")   # no retry used
    # Unfit on every island of the pool: the run stops on that input error.
    experts, _, manifest = stage(tmp_path / "all", clock, {0: ["unfit", "unfit"],
                                                           1: ["finish"]}, max_retries=3)
    with pytest.raises(InputError, match=r"islands.pool\[b\].memory_gb"):
        experts.run(quiet())
    assert [a["cause"] for a in manifest.expert(0)["attempts"]] == ["unfit island",
                                                                    "input error"]


def test_a_restarted_node_relaunches_its_experts_without_using_a_retry(tmp_path, clock):
    experts, _, manifest = stage(tmp_path, clock, {0: ["restart node", "restart node",
                                                       "finish"]},
                                 max_retries=0, islands=("a",))
    experts.run(quiet())
    assert [a["cause"] for a in manifest.expert(0)["attempts"]] == ["lost node"] * 2 + [
        "finished"]
    assert reasons(manifest, 0)[0] == (
        "a", "the Ray node died; the driver restarted its embedded Ray")
    assert [s for s in clock.slept if s > 0.5] == []  # no crash backoff


def test_an_expert_failed_after_its_retries_leaves_the_others_unless_abort(tmp_path, clock):
    experts, launcher, manifest = stage(tmp_path, clock, {0: ["crash"], 1: ["finish"]},
                                        max_retries=0)
    with pytest.raises(RuntimeError, match=r"experts \[0\] failed after all retries"):
        experts.run(quiet())
    assert manifest.expert(0)["state"] == "failed" and manifest.expert(1)["state"] == "done"
    assert manifest.expert(0)["attempts"][0]["cause"] == "crash"
    raw = tiny_config(f"file://{tmp_path}/abort", run="scripted",
                      islands={"pool": [{"name": "a", "speed": 1.0}, {"name": "b", "speed": 1.0}]},
                      fault_tolerance={"max_retries": 0, "on_expert_failure": "abort"})
    config = parse_config(raw)
    manifest = Manifest.open(RunLayout(f"file://{tmp_path}/abort/scripted"), config.run,
                             clusters=2)
    manifest.stage("partition")["stats"] = {"sizes": [100, 100]}
    launcher = ScriptedLauncher(clock, {"a", "b"}, {0: ["crash"], 1: ["hang"]})
    experts = ExpertsController(config, manifest, [0, 1], recipe(config), launcher,
                                FailurePolicy(0, abort_on_failure=True))
    with pytest.raises(RuntimeError, match="on_expert_failure: abort stopped the run"):
        experts.run(quiet())
    assert manifest.expert(1)["attempts"][-1]["cause"] == "cancelled"
    assert manifest.expert(1)["state"] == "cancelled" and launcher.live[0].cancelled


def test_a_crash_uses_up_a_retry_and_restarts_on_the_same_island(tmp_path, clock):
    experts, _, manifest = stage(tmp_path, clock, {0: ["crash", "crash", "finish"]},
                                 max_retries=2, islands=("a",))
    experts.run(quiet())
    assert reasons(manifest, 0) == [("a", "RuntimeError: worker died")] * 2 + [("a", "finished")]
    assert [s for s in clock.slept if s > 0.5] == [2.0, 4.0]


def test_crashes_past_max_retries_fail_the_expert(tmp_path, clock):
    experts, _, manifest = stage(tmp_path, clock, {0: ["crash", "crash"], 1: ["finish"]},
                                 max_retries=1)
    with pytest.raises(RuntimeError, match=r"experts \[0\] failed after all retries"):
        experts.run(quiet())
    assert manifest.expert(0)["state"] == "failed"
    assert [reason for _, reason in reasons(manifest, 0)] == ["RuntimeError: worker died"] * 2
    assert manifest.expert(1)["state"] == "done"


def test_an_input_error_aborts_the_run(tmp_path, clock):
    experts, launcher, manifest = stage(tmp_path, clock, {0: ["input"], 1: ["hang"]},
                                        max_retries=5)
    with pytest.raises(InputError, match="not a parquet file") as caught:
        experts.run(quiet())
    assert type(caught.value) is InputError
    assert manifest.expert(0)["state"] == "failed"
    assert reasons(manifest, 0) == [
        ("a", "input error: shards/0.parquet: not a parquet file")]
    assert launcher.closed  # the other expert's attempt is stopped


def test_cancel_request_stops_the_run_and_marks_its_experts_cancelled(tmp_path, clock):
    experts, launcher, manifest = stage(tmp_path, clock, {0: ["hang"], 1: ["hang"]},
                                        max_retries=0)
    storage.write_json(manifest.layout.cancel_request, {"requested": 1})
    with pytest.raises(RunCancelled):
        experts.run(quiet())
    for expert in (0, 1):  # as the stage reads (`islands status`), not pending
        assert manifest.expert(expert)["state"] == "cancelled"
        assert reasons(manifest, expert)[-1][1] == "cancelled by the user"
    assert all(attempt.cancelled for attempt in launcher.started)
    # Resumed, cancelled experts start again and finish, without using a retry.
    storage.remove(manifest.layout.cancel_request)
    resumed, _, _ = stage(tmp_path, clock, {0: ["finish"], 1: ["finish"]}, max_retries=0)
    resumed.run(quiet())
    manifest = Manifest.load(manifest.layout)
    for expert in (0, 1):
        assert manifest.expert(expert)["state"] == "done"
        assert [r for _, r in reasons(manifest, expert)] == ["cancelled by the user",
                                                             "finished"]


def test_earlier_cancels_and_stopped_drivers_use_no_retry_on_resume(tmp_path, clock):
    experts, _, manifest = stage(tmp_path, clock, {0: ["hang"]}, max_retries=1, islands=("a",))
    storage.write_json(manifest.layout.cancel_request, {"requested": 1})
    with pytest.raises(RunCancelled):
        experts.run(quiet())
    storage.remove(manifest.layout.cancel_request)
    manifest.start_attempt(0, "a")  # a driver that died during its attempt
    manifest.expert(0)["attempts"][-1]["reported_step"] = 7
    manifest.save()
    # Its third attempt crashes: the first crash, within max_retries=1, so it is retried.
    resumed, _, _ = stage(tmp_path, clock, {0: ["crash", "finish"]}, max_retries=1,
                          islands=("a",))
    resumed.run(quiet())
    manifest = Manifest.load(manifest.layout)
    assert [reason for _, reason in reasons(manifest, 0)] == [
        "cancelled by the user", "driver stopped during the attempt",
        "RuntimeError: worker died", "finished"]
    assert manifest.expert(0)["attempts"][1]["step"] == 7
    assert manifest.expert(0)["state"] == "done"


def test_expert_events_are_written_together_and_all_before_the_stage_ends(
        tmp_path, clock, monkeypatch):
    monkeypatch.setattr(manifest_module, "SAVE_SECONDS", 3600.0)  # none falls due meanwhile
    writes = []
    save = Manifest.save
    monkeypatch.setattr(Manifest, "save", lambda self: (writes.append(1), save(self))[1])
    experts, _, manifest = stage(tmp_path, clock, {k: ["finish"] for k in range(6)},
                                 max_retries=0)
    writes.clear()
    experts.run(quiet())
    assert len(writes) == 2  # the plan, then 12 starts and ends in one write
    on_disk = Manifest.load(manifest.layout)
    assert [on_disk.expert(k)["state"] for k in range(6)] == ["done"] * 6
    assert [reasons(on_disk, k) for k in range(6)] == [reasons(manifest, k) for k in range(6)]


def test_the_controller_never_loads_ray():
    code = ("import sys, orchestrator.control.controller, orchestrator.control.launcher; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'ray')))")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", "import json; " + code], check=True,
                         capture_output=True, text=True, cwd=repo,
                         env={**os.environ, "PYTHONPATH": str(repo)}).stdout
    assert json.loads(out) == []
