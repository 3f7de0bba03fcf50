"""What distilling an ensemble into one student shares across modalities: the student's
recipe, and its meta.json entry about the teacher. Each modality's distill.py keeps its
objective, what one teacher forward runs, and its model's width rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.control.expert_specs import ExpertRecipe
from orchestrator.ensemble import Ensemble, Routing
from worker.objectives import count_flops


def teacher_entry(teacher: Ensemble, routing: Routing, forward: Callable[..., Any],
                  *inputs: Any) -> dict[str, Any]:
    """The student's meta.json `teacher`: its routing, and the FLOPs of `forward` on
    `inputs` (one sample's teacher forward), counted without adding to the ensemble's
    expert calls."""
    calls = teacher.expert_rows
    flops = count_flops(forward, *inputs)
    teacher.expert_rows = calls
    return {"strategy": routing.strategy, "top_k": routing.top_k, "forward_flops": flops}


def student_recipe_of(expert_meta: dict[str, Any], model_kwargs: dict[str, Any],
                      objective: str, module: str, routing: Routing, run: str,
                      **objective_kwargs: Any) -> ExpertRecipe:
    """The experts' model with `model_kwargs`, trained by `objective` (registered when
    `module` is imported) on `run`'s ensemble routed as `routing` says."""
    return ExpertRecipe(model=expert_meta["model"], model_kwargs=model_kwargs,
                        objective=objective,
                        objective_kwargs={**objective_kwargs, "run": run,
                                          "strategy": routing.strategy,
                                          "top_k": routing.top_k},
                        imports=(module,))
