"""The image lane of `islands serve`: DDM requests (n images, seed, steps, routing) walked
together one denoising step at a time on the ensemble engine; each image answered as a PNG
with the experts every one of its steps used."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from orchestrator.ensemble import Ensemble, Routing
from orchestrator.evaluate.pictures import grid_png
from orchestrator.modalities.image.sampling import Denoising, SampleRequest, Walk
from orchestrator.state.config import RunConfig
from worker.flow import to_pixels


def png(pixels: torch.Tensor) -> bytes:
    """uint8 [H, W, C] -> PNG bytes at the image's own size."""
    array = pixels.numpy()
    picture = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def routing_trace(trace: list[torch.Tensor], image: int) -> dict[str, Any]:
    """Which experts one image's steps used, and with what weight."""
    weights = [step[image] for step in trace]
    return {"experts": [row.nonzero().flatten().tolist() for row in weights],
            "weights": [[round(float(w), 4) for w in row] for row in weights]}


class ImageLane:
    endpoint = "images"
    unit = "images"

    def __init__(self, ensemble: Ensemble, metas: Sequence[dict[str, Any]],
                 config: RunConfig) -> None:
        self.ensemble = ensemble
        self.image_shape = tuple(metas[0]["image_shape"])
        self.default_steps = config.inference.sample_steps
        self.denoising = Denoising(ensemble, self.image_shape, trace=True)

    def check(self, body: Any) -> None:
        """Nothing beyond the body's own schema: every image request fits."""

    def open(self, bodies: Sequence[Any]) -> list[Walk]:
        return [self.denoising.add(SampleRequest(
            body.n, body.steps or self.default_steps,
            Routing(body.routing.strategy, body.routing.k), body.seed)) for body in bodies]

    def rows(self, walk: Walk) -> int:
        return walk.request.count

    def step(self, walks: Sequence[Walk]) -> None:
        with torch.inference_mode():
            self.denoising.step(walks)

    def finished(self, walk: Walk) -> bool:
        return walk.finished

    def fresh(self, walk: Walk) -> str:
        return ""

    def result(self, walk: Walk, body: Any) -> dict[str, Any]:
        pixels = to_pixels(walk.x)
        trace = walk.trace or []
        data = [{"b64_json": base64.b64encode(png(image)).decode(),
                 "routing": routing_trace(trace, index)}
                for index, image in enumerate(pixels)]
        answer: dict[str, Any] = {"data": data, "steps": walk.request.steps,
                                  "expert_calls_per_image": sum(
                                      len(row) for image in data
                                      for row in image["routing"]["experts"]) / len(data)}
        if body.grid:  # the grid `islands sample` writes for the same request
            answer["grid_b64"] = base64.b64encode(grid_png(walk.x)).decode()
        return answer

    def retire(self, walks: Sequence[Walk]) -> None:
        self.denoising.retire(walks)
