"""Step-level continuous batching: requests join and leave between steps; every step
advances all requests in flight in one engine call (the router once on the whole batch,
each expert once on the rows routed to it), so requests at different steps share it.

The asyncio loop owns the queue and the jobs; the modality's lane (its requests in
flight, the ensemble) is touched only by the one step thread, between which the loop
admits, drops and answers jobs."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from orchestrator.ensemble import Ensemble, ExpertsDown, NoHealthyExpert
from orchestrator.serve.metrics import ServeMetrics
from orchestrator.serve.options import ServeOptions

log = logging.getLogger("islands.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    pass


class ClientGone(Exception):
    pass


@dataclass(eq=False)
class Job:
    body: Any
    deadline: float
    future: asyncio.Future
    chunks: asyncio.Queue | None = None  # streamed text, then None
    handle: Any = None  # the lane's request in flight
    cancelled: bool = False
    degraded: set[int] = field(default_factory=set)  # experts down during one of its steps
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Advanced:
    """What one step thread call hands back to the loop."""

    fresh: dict[Job, str]
    results: dict[Job, dict[str, Any]]
    failed: dict[Job, Exception]


class StepBatcher:
    def __init__(self, lane: Any, ensemble: Ensemble, options: ServeOptions,
                 metrics: ServeMetrics) -> None:
        self.lane = lane
        self.ensemble = ensemble
        self.options = options
        self.metrics = metrics
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.wake = asyncio.Event()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="islands-step")
        self.service_s = 1.0  # moving mean of a request's time in flight, for Retry-After
        self.steps = 0

    def retry_after(self) -> int:
        slots = max(1, self.options.max_inflight)
        return max(1, math.ceil(self.service_s * (len(self.waiting) + 1) / slots))

    def submit(self, body: Any, stream: bool = False) -> Job:
        """Queue a request (checked by the lane already); QueueFull when no room is left."""
        free = max(0, self.options.max_inflight - len(self.running))
        if len(self.waiting) >= self.options.max_queue + free:
            raise QueueFull(self.retry_after())
        timeout = min(body.timeout or self.options.deadline_s, self.options.deadline_s)
        job = Job(body, time.monotonic() + timeout, asyncio.get_running_loop().create_future(),
                  asyncio.Queue() if stream else None)
        self.waiting.append(job)
        self.metrics.queue_depth.set(len(self.waiting))
        self.wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client left: its slot is freed at the next step."""
        job.cancelled = True
        self.wake.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.running and not self.waiting:
                self.metrics.inflight.set(0)
                self.metrics.queue_depth.set(0)
                self.wake.clear()
                await self.wake.wait()
            now = time.monotonic()
            for job in [job for job in self.waiting if job.cancelled or now > job.deadline]:
                self.waiting.remove(job)
                self._fail(job, ClientGone() if job.cancelled else DeadlineExceeded())
            admit: list[Job] = []
            while self.waiting and len(self.running) + len(admit) < self.options.max_inflight:
                admit.append(self.waiting.popleft())
            leaving = [job for job in self.running if job.cancelled or now > job.deadline]
            for job in leaving:
                self._fail(job, ClientGone() if job.cancelled else DeadlineExceeded())
            running = [job for job in self.running if job not in leaving] + admit
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.inflight.set(len(running))
            if not running and not leaving:
                self.running = []
                continue
            try:
                done = await loop.run_in_executor(self.pool, self._advance, running, admit,
                                                  leaving)
            except Exception as err:  # every expert down, or a bug: fail what is in flight
                log.exception("step failed")
                for job in running:
                    self._fail(job, err)
                self.running = []
                self._reset_lane(running)
                continue
            for job, text in done.fresh.items():
                if text and job.chunks is not None:
                    job.chunks.put_nowait(text)
            for job, err in done.failed.items():
                self._fail(job, err)
            for job, result in done.results.items():
                if not job.future.done():
                    job.future.set_result(result)
                if job.chunks is not None:
                    job.chunks.put_nowait(None)
                elapsed = time.monotonic() - job.arrived
                self.service_s = 0.8 * self.service_s + 0.2 * elapsed
            self.running = [job for job in running
                            if job not in done.results and job not in done.failed]

    def _fail(self, job: Job, err: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(err)
        if job.chunks is not None:
            job.chunks.put_nowait(None)

    def _reset_lane(self, jobs: list[Job]) -> None:
        self.lane.retire([job.handle for job in jobs if job.handle is not None])

    def _advance(self, running: list[Job], admit: list[Job], leaving: list[Job]) -> Advanced:
        """In the step thread: retire who left, open who joined, one step of everyone."""
        self.lane.retire([job.handle for job in leaving if job.handle is not None])
        failed: dict[Job, Exception] = {}
        if admit:
            for job, handle in zip(admit, self.lane.open([job.body for job in admit]),
                                   strict=True):
                job.handle = handle
        started = time.perf_counter()
        shared = [job for job in running if not job.body.deterministic]
        # A deterministic request is stepped on its own: the same shapes, so the same
        # bytes, whatever else is in flight.
        groups = [shared] + [[job] for job in running if job.body.deterministic]
        for group in groups:
            if group:
                self._step([job.handle for job in group])
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.steps += 1
        down = self.ensemble.down
        if down:
            for job in running:
                job.degraded |= set(down)
        fresh = {job: self.lane.fresh(job.handle) for job in running if job.chunks is not None}
        results = {job: self.lane.result(job.handle, job.body) for job in running
                   if self.lane.finished(job.handle)}
        self.lane.retire([job.handle for job in results])
        return Advanced(fresh, results, failed)

    def _step(self, handles: list[Any]) -> None:
        # An expert that fails mid-step is marked down by the dispatch: the same step is
        # taken again, routed over the experts still up (nothing moved yet).
        for _ in range(self.ensemble.clusters + 1):
            try:
                self.lane.step(handles)
                return
            except ExpertsDown as err:
                log.warning("%s; stepping again over the others", err)
        raise NoHealthyExpert("every expert failed in one step")
