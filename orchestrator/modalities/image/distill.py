"""Distilling the DDM ensemble into one U-Net: the student regresses the ensemble's
velocity v(x_t, t) (routed as asked) at random t and noise over the run's training images.

The objective is registered in the worker's registry (`distill_flow`), so the student trains
in the experts' own loop (worker/train.py): same checkpoints, resume and schedule."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.control.expert_specs import ExpertRecipe
from orchestrator.ensemble import Ensemble, Routing
from orchestrator.modalities.image.sampling import add_velocities, load_ensemble, velocity
from orchestrator.modalities.student import student_recipe_of, teacher_entry
from orchestrator.state.config import RunConfig
from orchestrator.state.run_config import open_run_dir
from runstore.errors import InputError
from runstore.shards import read_shard_pixels
from worker.flow import draw_noise, noisy, to_model_space
from worker.objectives import Batch, count_flops, register_objective

OBJECTIVE = "distill_flow"


class EnsembleVelocity:
    """Flow matching against the ensemble: a row is one training image; its batch holds
    x_t, t and the teacher's velocity there (computed once, when the batch is drawn)."""

    def __init__(self, shard_urls: list[str], run: str, strategy: str, top_k: int) -> None:
        self.pixels = torch.from_numpy(read_shard_pixels(shard_urls))
        self.rows = len(self.pixels)
        _, manifest = open_run_dir(run)
        self.teacher, _ = load_ensemble(manifest)
        self.routing = Routing(strategy, top_k)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        x0 = to_model_space(self.pixels[index])
        t, noise = draw_noise(x0, generator)
        x_t = noisy(x0, t, noise)
        return {"x": x_t, "t": t, "target": velocity(self.teacher, x_t, t, self.routing)}

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return ((model(batch["x"], batch["t"]) - batch["target"]) ** 2).flatten(1).mean(1).sum()

    def units(self, batch: Batch) -> float:
        return float(len(batch["x"]))

    def forward_flops(self, model: torch.nn.Module) -> float:
        return count_flops(model, to_model_space(self.pixels[:1]), torch.zeros(1))

    def meta(self) -> dict[str, Any]:
        x = to_model_space(self.pixels[:1])
        # One sample's teacher forward: the router and every expert the routing runs.
        return {"image_shape": list(x.shape[1:]),
                "teacher": teacher_entry(
                    self.teacher, self.routing,
                    lambda x, t: velocity(self.teacher, x, t, self.routing), x,
                    torch.full((1,), 0.5))}


register_objective(OBJECTIVE, EnsembleVelocity)


def student_recipe(config: RunConfig, expert_meta: dict[str, Any], width: int | None,
                   routing: Routing, run: str) -> ExpertRecipe:
    """The experts' U-Net, or one `width` channels wide, trained on the ensemble."""
    kwargs = dict(expert_meta["model_kwargs"])
    if width is not None:
        if width < 4 or width % 2:
            raise InputError("--width", f"{width}: the U-Net's channels must be even and at "
                             "least 4 (its time embedding is half sines, half cosines)")
        kwargs["channels"] = width
    return student_recipe_of(expert_meta, kwargs, OBJECTIVE, __name__, routing, run)


def load_student_ensemble(student: torch.nn.Module) -> Ensemble:
    """The student behind the engine as a one-expert ensemble: sampled like any model."""
    return Ensemble([student], None, add_velocities)
