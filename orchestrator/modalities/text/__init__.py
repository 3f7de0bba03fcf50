"""Text (c-BTM): byte-level transformer experts, routing by distance to the partition's
cluster centres, a log-space mixture of the experts' next-byte distributions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.modalities.spec import ModalitySpec, lazy
from orchestrator.state.config import RunConfig
from runstore.errors import InputError

if TYPE_CHECKING:
    from orchestrator.control.expert_specs import ExpertRecipe
    from orchestrator.ensemble import Ensemble
    from orchestrator.state.manifest import Manifest
    from runstore.layout import RunLayout

MODELS = ("byte_lm",)
DEFAULT_FEATURES = "tfidf"  # c-BTM's tf-idf, when partition.features is not set
_HERE = "orchestrator.modalities.text"


def check_config(config: RunConfig) -> None:
    """Eval scores a held-out text's bytes after its prefix and within the context: a
    prefix as long as the context would leave nothing to score."""
    prefix, context = config.eval.prefix_bytes, config.experts.context
    if prefix >= context:
        raise InputError("eval.prefix_bytes", f"{prefix} leaves nothing to score: eval "
                         f"scores the bytes after it within the experts' context of "
                         f"{context} (experts.context); expected fewer than {context}")


def check_partition(config: RunConfig, layout: RunLayout, stats: dict[str, Any]) -> None:
    from orchestrator.modalities.text import evaluation
    from runstore.shards import longest_text

    longest, texts = longest_text(layout, int(stats["clusters"]), "heldout")
    evaluation.check_scoreable(longest, texts, config.eval.prefix_bytes)


def expert_recipe(config: RunConfig, stats: dict[str, Any]) -> ExpertRecipe:
    from orchestrator.control.expert_specs import ExpertRecipe

    cfg = config.experts
    return ExpertRecipe(
        model=cfg.model or MODELS[0],
        model_kwargs={"context": cfg.context, "width": cfg.width, "depth": cfg.depth,
                      "heads": cfg.heads},
        objective="lm", objective_kwargs={"context": cfg.context})


def ensemble_of(config: RunConfig, manifest: Manifest) -> tuple[Ensemble, list[dict]]:
    from orchestrator.modalities.text.generation import load_ensemble

    return load_ensemble(manifest, config.router.temperature)


def router_of(config: RunConfig, manifest: Manifest) -> object:
    from orchestrator.modalities.text.generation import load_centroid_router

    return load_centroid_router(manifest, config.clusters, config.router.temperature)


_describe = lazy("partitioner.text_datasets:describe_text_source")


def describe_data(config: RunConfig) -> str:
    data = config.data
    return _describe(data.source, data.split, data.text_column, data.text_unit)


spec = ModalitySpec(
    name="text", default_features=DEFAULT_FEATURES,
    read_rows=lazy("partitioner.text_datasets:read_text_rows"),
    expert_recipe=expert_recipe, build_router=lazy(f"{_HERE}.router:build_router"),
    combine=lazy(f"{_HERE}.generation:mix_log_probs"), load_ensemble=ensemble_of,
    evaluate=lazy(f"{_HERE}.evaluation:evaluate"),
    attach_baseline=lazy(f"{_HERE}.evaluation:attach_baseline"),
    report_tables=lazy(f"{_HERE}.evaluation:report_tables"),
    report_png=lazy(f"{_HERE}.evaluation:report_png"),
    verbs=frozenset({"generate"}), models=MODELS, check_config=check_config,
    check_partition=check_partition, describe_data=describe_data, load_router=router_of,
    student_recipe=lazy(f"{_HERE}.distill:student_recipe"),
    student_ensemble=lazy(f"{_HERE}.distill:load_student_ensemble"),
    serve_lane=lazy(f"{_HERE}.serving:TextLane"))
