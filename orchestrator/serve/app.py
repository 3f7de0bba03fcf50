"""The ingress: FastAPI routes on one Serve deployment that holds the router, the request
queue and the step loop; the experts live inside it (layout inprocess) or in their own
deployments on their islands (layout deployments)."""



import asyncio
import json
import logging
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve

from orchestrator.serve.batcher import ClientGone, DeadlineExceeded, QueueFull, StepBatcher
from orchestrator.serve.metrics import ServeMetrics
from orchestrator.serve.options import ServeOptions
from orchestrator.serve.schemas import CompletionBody, ImageBody, error_body, field_of

log = logging.getLogger("islands.serve")
api = FastAPI(title="islands", summary="A trained ensemble of experts behind its router.")
DEGRADED_HEADER = "X-Islands-Degraded"
ROUTES = {"images": "/v1/images/generations", "completions": "/v1/completions"}


@api.exception_handler(RequestValidationError)
async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    field = field_of(first.get("loc", ()))
    message = f"{field}: {first.get('msg', 'invalid')}"
    return JSONResponse(error_body(message, "invalid_request_error", field), status_code=422)


def error(status: int, message: str, kind: str, param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)


class TimedRouter:
    """The router, its calls timed into /metrics."""

    def __init__(self, router: Any, metrics: ServeMetrics) -> None:
        self.router = router
        self.metrics = metrics

    def __call__(self, *inputs: Any) -> Any:
        started = time.perf_counter()
        probs = self.router(*inputs)
        self.metrics.router_seconds.observe(time.perf_counter() - started)
        return probs


@serve.deployment(max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class EnsembleServer:
    async def __init__(self, options: ServeOptions, expert_apps: list[tuple[str, str]]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.options = options
        self.expert_apps = expert_apps
        self.metrics = ServeMetrics()
        self.loop = asyncio.get_running_loop()
        self.status = "loading the router and experts"
        self.batcher: StepBatcher | None = None
        self.remote: Any = None
        self.models: dict[str, Any] = {}
        self.ensemble: Any = None
        self.lane: Any = None
        self.started = self.loop.create_task(self._start())

    # -- start-up ----------------------------------------------------------------------
    def _load(self) -> None:
        import torch

        from orchestrator.ensemble import Ensemble
        from orchestrator.ensemble.experts import load_experts
        from orchestrator.modalities import modality_of
        from orchestrator.serve.experts import RemoteExpert
        from orchestrator.serve.runs import open_finished

        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        config, manifest = open_finished(self.options.run)
        spec = modality_of(config)
        if self.options.layout == "inprocess":
            experts, metas = load_experts(manifest)
            router = spec.load_router(config, manifest)
        else:
            metas = [json.loads(manifest.read_verified(f"experts/expert-{k}/final/meta.json"))
                     for k in manifest.experts]
            experts = [RemoteExpert(k) for k in manifest.experts]
            router = spec.load_router(config, manifest)
        ensemble = Ensemble(experts, None if router is None else TimedRouter(router,
                                                                             self.metrics),
                            spec.combine)
        self.lane = spec.serve_lane(ensemble, metas, config)
        self.ensemble = ensemble
        self.models = {"id": config.run, "modality": spec.name, "endpoint": self.lane.endpoint,
                       "layout": self.options.layout,
                       "experts": [{"id": f"{config.run}/expert-{k}", "expert": k,
                                    "island": manifest.expert(k).get("island")}
                                   for k in manifest.experts]}

    async def _start(self) -> None:
        try:
            await self.loop.run_in_executor(None, self._load)
            if self.options.layout == "deployments":
                await self._reach_experts()
            else:
                self.ensemble.dispatch = self._local_dispatch
            self.batcher = StepBatcher(self.lane, self.ensemble, self.options, self.metrics)
            self.loop.create_task(self.batcher.serve_forever())
            self.status = "ready"
            log.info("ready: %s, %d experts, layout %s", self.models["id"],
                     len(self.models["experts"]), self.options.layout)
        except Exception as err:  # shown by /readyz; the process stays up to say so
            log.exception("start failed")
            self.status = f"failed: {type(err).__name__}: {err}"

    async def _reach_experts(self) -> None:
        from orchestrator.serve.experts import RemoteExperts

        handles = []
        for app_name, deployment in self.expert_apps:
            while True:  # the expert applications are deployed after this one
                try:
                    handles.append(serve.get_deployment_handle(deployment, app_name))
                    break
                except Exception:
                    self.status = f"waiting for {deployment} to be deployed"
                    await asyncio.sleep(0.5)
        self.remote = RemoteExperts(handles, self.ensemble, self.metrics,
                                    self.options.expert_timeout_s, self.loop)
        while True:
            up = await self.remote.answering()
            self.status = f"waiting for experts: {len(up)} of {len(handles)} answer"
            if len(up) == len(handles):
                break
            await asyncio.sleep(0.5)
        self.ensemble.dispatch = self.remote.dispatch
        self.loop.create_task(self.remote.watch())

    def _local_dispatch(self, run: Any, calls: list[Any]) -> list[Any]:
        outputs = []
        for k, inputs in calls:
            self.metrics.call_rows.labels(str(k)).observe(len(inputs[0]))
            outputs.append(run(self.ensemble.experts[k], *inputs))
        return outputs

    # -- routes ------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        html = resources.files("orchestrator.serve").joinpath("page.html").read_text()
        return HTMLResponse(html)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    def _down(self) -> list[int]:
        return sorted(self.ensemble.down) if self.ensemble is not None else []

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        if self.batcher is None:
            return JSONResponse({"ready": False, "reason": self.status}, status_code=503)
        down = self._down()
        experts = len(self.models["experts"])
        body = {"ready": True, "degraded": bool(down), "experts": experts,
                "up": experts - len(down), "down": [f"expert-{k}" for k in down],
                "layout": self.options.layout}
        headers = {DEGRADED_HEADER: ",".join(body["down"])} if down else None
        return JSONResponse(body, headers=headers)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        if not self.models:
            return error(503, f"not ready: {self.status}", "server_error")
        down = set(self._down())
        ensemble = {"id": self.models["id"], "object": "model", "owned_by": "islands",
                    "modality": self.models["modality"], "layout": self.models["layout"],
                    "endpoint": ROUTES[self.models["endpoint"]]}
        experts = [{"id": e["id"], "object": "model", "owned_by": "islands",
                    "parent": self.models["id"], "island": e["island"],
                    "up": e["expert"] not in down} for e in self.models["experts"]]
        return JSONResponse({"object": "list", "data": [ensemble, *experts]})

    @api.post("/v1/images/generations")
    async def images(self, body: ImageBody) -> Response:
        return await self._answer("images", body)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionBody) -> Response:
        return await self._answer("completions", body)

    async def _answer(self, endpoint: str, body: Any) -> Response:
        from runstore.errors import InputError

        if self.batcher is None:
            self.metrics.requests.labels(endpoint, "503").inc()
            return error(503, f"not ready: {self.status}", "server_error")
        if self.lane.endpoint != endpoint:
            self.metrics.requests.labels(endpoint, "404").inc()
            other = f"POST {ROUTES[self.lane.endpoint]}"
            return error(404, f"this is an ensemble of {self.models['modality']} experts: "
                         f"use {other}", "invalid_request_error")
        problem = self._check(body)
        if problem is None:
            try:
                self.lane.check(body)
            except InputError as err:
                problem = (err.where, err.problem)
        if problem is not None:
            self.metrics.requests.labels(endpoint, "422").inc()
            return error(422, f"{problem[0]}: {problem[1]}", "invalid_request_error",
                         problem[0])
        stream = bool(getattr(body, "stream", False))
        try:
            job = self.batcher.submit(body, stream)
        except QueueFull as err:
            self.metrics.requests.labels(endpoint, "429").inc()
            return error(429, str(err), "rate_limit_exceeded",
                         headers={"Retry-After": str(err.retry_after)})
        if stream:
            return StreamingResponse(self._events(endpoint, job),
                                     media_type="text/event-stream")
        try:
            result = await job.future
        except asyncio.CancelledError:  # the client went away: free its slot
            self.batcher.cancel(job)
            self.metrics.requests.labels(endpoint, "499").inc()
            raise
        except Exception as err:
            status, kind = self._status_of(err)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            return error(status, str(err) or type(err).__name__, kind)
        self.metrics.requests.labels(endpoint, "200").inc()
        headers = ({DEGRADED_HEADER: ",".join(f"expert-{k}" for k in sorted(job.degraded))}
                   if job.degraded else None)
        return JSONResponse(self._shape(endpoint, result, job), headers=headers)

    def _check(self, body: Any) -> tuple[str, str] | None:
        experts = len(self.models["experts"])
        if body.model is not None and body.model != self.models["id"]:
            return "model", f"{body.model!r} is not served here; expected {self.models['id']!r}"
        if body.routing.strategy == "topk" and body.routing.k > experts:
            return "routing.k", f"is {body.routing.k} but the ensemble has {experts} experts"
        return None

    @staticmethod
    def _status_of(err: Exception) -> tuple[int, str]:
        from orchestrator.ensemble import NoHealthyExpert

        if isinstance(err, DeadlineExceeded):
            return 504, "timeout"
        if isinstance(err, ClientGone):
            return 499, "client_closed"
        if isinstance(err, NoHealthyExpert):
            return 503, "server_error"
        return 500, "server_error"

    def _shape(self, endpoint: str, result: dict[str, Any], job: Any) -> dict[str, Any]:
        created = int(time.time())
        degraded = [f"expert-{k}" for k in sorted(job.degraded)]
        if endpoint == "images":
            return {"created": created, "model": self.models["id"], **result,
                    "degraded": degraded}
        usage = {"prompt_tokens": result["prompt_bytes"],
                 "completion_tokens": result["completion_bytes"],
                 "total_tokens": result["prompt_bytes"] + result["completion_bytes"]}
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": created, "model": self.models["id"],
                "choices": [{"index": 0, "text": result["text"], "logprobs": None,
                             "finish_reason": result["finish_reason"],
                             "routing": result["routing"]}],
                "usage": usage, "degraded": degraded}

    async def _events(self, endpoint: str, job: Any):
        """Server-sent events: one per step's new text, the final one with its reason."""
        ident = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def event(text: str, finish: str | None, **extra: Any) -> str:
            chunk = {"id": ident, "object": "text_completion", "created": created,
                     "model": self.models["id"],
                     "choices": [{"index": 0, "text": text, "logprobs": None,
                                  "finish_reason": finish}], **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            while True:
                chunk = await job.chunks.get()
                if chunk is None:
                    break
                yield event(chunk, None)
            try:
                result = job.future.result()
            except Exception as err:
                status, kind = self._status_of(err)
                self.metrics.requests.labels(endpoint, str(status)).inc()
                yield f"data: {json.dumps(error_body(str(err) or kind, kind))}\n\n"
            else:
                self.metrics.requests.labels(endpoint, "200").inc()
                yield event("", result["finish_reason"], routing=result["routing"],
                            degraded=[f"expert-{k}" for k in sorted(job.degraded)])
            yield "data: [DONE]\n\n"
        finally:
            if not job.future.done():  # the client left mid-stream
                self.batcher.cancel(job)
                self.metrics.requests.labels(endpoint, "499").inc()
