"""Experts on their islands: one Serve deployment per expert (ExpertReplica), pinned to the
island it trained on, and the ingress's side of them (RemoteExperts): a step's calls sent
to all at once, health by ping, and the degraded mode: an expert that fails or stops
answering is marked down, the router renormalises over the others, and it rejoins once
it answers again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import torch

from orchestrator.ensemble import Ensemble, ExpertCall, ExpertsDown
from orchestrator.ensemble.engine import RunExpert
from orchestrator.serve.metrics import ServeMetrics

log = logging.getLogger("islands.serve")
PING_EVERY_S = 0.5
PING_TIMEOUT_S = 2.0


class ExpertReplica:
    """One expert's final weights, verified against the manifest, on this node's device."""

    def __init__(self, root: str, expert: int, threads: int, gpus: float) -> None:
        from orchestrator.ensemble.experts import load_expert
        from orchestrator.state.manifest import Manifest
        from runstore.layout import RunLayout

        if threads:
            torch.set_num_threads(threads)
        self.expert = expert
        self.device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        model, _ = load_expert(Manifest.load(RunLayout(root)), expert)
        self.model = model.to(self.device)

    def __call__(self, run: RunExpert, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return run(self.model, *(x.to(self.device) for x in inputs)).cpu()

    def ping(self) -> int:
        return self.expert


class RemoteExpert:
    """Where an expert's module would be in the ensemble: calls go through the dispatch."""

    def __init__(self, expert: int) -> None:
        self.expert = expert


class RemoteExperts:
    def __init__(self, handles: Sequence[Any], ensemble: Ensemble, metrics: ServeMetrics,
                 timeout_s: float, loop: asyncio.AbstractEventLoop) -> None:
        self.handles = list(handles)
        self.ensemble = ensemble
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.loop = loop
        # Calls in flight per expert: cancelled when a ping finds their expert down, so a
        # step waiting on a dead replica (Serve may hold the call for its successor) is
        # taken again at once over the others.
        self.pending: dict[int, set[asyncio.Task]] = {}
        for k in range(len(self.handles)):
            metrics.expert_up.labels(str(k)).set(0)

    def dispatch(self, run: RunExpert, calls: list[ExpertCall]) -> list[torch.Tensor]:
        """From the step thread: every call of the step at once, on the ingress's loop."""
        return asyncio.run_coroutine_threadsafe(self._gather(run, calls), self.loop).result()

    async def _gather(self, run: RunExpert, calls: list[ExpertCall]) -> list[torch.Tensor]:
        for k, inputs in calls:
            self.metrics.call_rows.labels(str(k)).observe(len(inputs[0]))
        tasks = [asyncio.ensure_future(asyncio.wait_for(self._call(k, run, inputs),
                                                        self.timeout_s))
                 for k, inputs in calls]
        for (k, _), task in zip(calls, tasks, strict=True):
            self.pending.setdefault(k, set()).add(task)
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for (k, _), task in zip(calls, tasks, strict=True):
                self.pending[k].discard(task)
        failed = [k for (k, _), result in zip(calls, results, strict=True)
                  if isinstance(result, BaseException)]
        if failed:
            for (k, _), result in zip(calls, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("expert %d failed: %s", k, type(result).__name__)
            self._mark(set(self.ensemble.down) | set(failed))
            raise ExpertsDown(failed)
        return list(results)  # type: ignore[arg-type]

    async def _call(self, k: int, run: RunExpert, inputs: tuple[torch.Tensor, ...]) -> Any:
        return await self.handles[k].remote(run, *inputs)

    async def _ping(self, k: int) -> bool:
        try:
            await asyncio.wait_for(self.handles[k].ping.remote(), PING_TIMEOUT_S)
            return True
        except Exception:
            return False

    async def answering(self) -> set[int]:
        up = await asyncio.gather(*(self._ping(k) for k in range(len(self.handles))))
        return {k for k, ok in enumerate(up) if ok}

    def _mark(self, down: set[int]) -> None:
        if frozenset(down) != self.ensemble.down:
            if down - self.ensemble.down:
                log.warning("experts down: %s", sorted(down))
            if self.ensemble.down - down:
                log.warning("experts back: %s", sorted(self.ensemble.down - down))
        self.ensemble.down = frozenset(down)
        for k in down:
            for task in self.pending.get(k, ()):
                task.cancel()
        for k in range(len(self.handles)):
            self.metrics.expert_up.labels(str(k)).set(0 if k in down else 1)

    async def watch(self) -> None:
        """Ping every expert twice a second: down when it stops answering, up when back."""
        while True:
            up = await self.answering()
            self._mark(set(range(len(self.handles))) - up)
            await asyncio.sleep(PING_EVERY_S)
