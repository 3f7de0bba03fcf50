"""Distilling the c-BTM ensemble into one byte LM: at every position of the run's training
windows the student learns the ensemble's next-byte mixture, by KL(mixture || student).

Each window is routed on its own text, as a prompt is (the routing is per text, not per
position). The objective is registered in the worker's registry (`distill_lm`), so the
student trains in the experts' own loop (worker/train.py)."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.control.expert_specs import ExpertRecipe
from orchestrator.ensemble import Ensemble, Routing
from orchestrator.modalities.student import student_recipe_of, teacher_entry
from orchestrator.modalities.text.generation import load_ensemble, log_probs, mix_log_probs
from orchestrator.state.config import RunConfig
from orchestrator.state.run_config import open_run_dir
from runstore.errors import InputError
from worker.models.byte_lm import PAD, decode
from worker.objectives import Batch, LanguageObjective, register_objective

OBJECTIVE = "distill_lm"


class EnsembleNextByte(LanguageObjective):
    """The experts' windows ([BOS] text [EOS] ... packed, context + 1 tokens); a batch also
    holds the teacher's log-probabilities of the next byte at every position."""

    def __init__(self, shard_urls: list[str], context: int, run: str, strategy: str,
                 top_k: int) -> None:
        super().__init__(shard_urls, context)
        config, manifest = open_run_dir(run)
        self.teacher, _ = load_ensemble(manifest, config.router.temperature)
        self.routing = Routing(strategy, top_k)

    def _teacher_log_probs(self, inputs: torch.Tensor) -> torch.Tensor:
        texts = [decode(row) for row in inputs.tolist()]
        weights = self.teacher.route((texts,), self.routing)
        return log_probs(self.teacher, inputs, weights)

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        window = self.windows[index].long()
        return {"window": window, "teacher": self._teacher_log_probs(window[:, :-1])}

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """KL(teacher || student) in nats, summed over the positions that have a target."""
        window, teacher = batch["window"], batch["teacher"]
        student = torch.log_softmax(model(window[:, :-1]).float(), dim=-1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)
        return kl[window[:, 1:] != PAD].sum()

    def meta(self) -> dict[str, Any]:
        # One window's teacher forward: every expert the routing runs (the centroid router
        # embeds with scikit-learn, outside torch, and is not counted).
        return {**super().meta(),
                "teacher": teacher_entry(self.teacher, self.routing, self._teacher_log_probs,
                                         self.windows[:1, :-1].long())}


register_objective(OBJECTIVE, EnsembleNextByte)


def student_recipe(config: RunConfig, expert_meta: dict[str, Any], width: int | None,
                   routing: Routing, run: str) -> ExpertRecipe:
    """The experts' byte LM, or one `width` wide, trained on the ensemble."""
    kwargs = dict(expert_meta["model_kwargs"])
    if width is not None:
        heads = kwargs["heads"]
        if width < heads or width % heads:
            raise InputError("--width", f"{width}: the byte LM's width must be a multiple of "
                             f"its {heads} attention heads (experts.heads)")
        kwargs["width"] = width
    return student_recipe_of(expert_meta, kwargs, OBJECTIVE, __name__, routing, run,
                             context=kwargs["context"])


def load_student_ensemble(student: torch.nn.Module) -> Ensemble:
    """The student behind the engine as a one-expert ensemble: generates like any model."""
    return Ensemble([student], None, mix_log_probs)
