"""What a modality is: one spec bundling every choice that differs between images and text
(the pattern of torchtitan's TrainSpec: a dataclass of builders, picked by name).

The spec is the composition root: it binds the partitioner's row reader and extractors, the
worker's model and objective, the router, how expert outputs combine in the ensemble engine,
and the evaluation. The stage driver and the CLI ask the spec; they never ask which modality
a run is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.state.config import RunConfig

if TYPE_CHECKING:  # the spec names its builders; importing them (torch...) waits for a call
    from rich.console import Console
    from rich.table import Table

    from orchestrator.control.expert_specs import ExpertRecipe
    from orchestrator.ensemble import Combine, Ensemble
    from orchestrator.state.manifest import Manifest
    from partitioner.request import RowReader
    from runstore.layout import RunLayout

def lazy(target: str) -> Callable[..., Any]:
    """The function `module:name`, imported at its first call: a modality's spec can name
    its builders without the CLI paying for torch and scikit-learn on every verb."""
    module, name = target.split(":")
    loaded: list[Callable[..., Any]] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not loaded:
            loaded.append(getattr(importlib.import_module(module), name))
        return loaded[0](*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


Report = dict[str, Any]
Pictures = dict[str, bytes]


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    default_features: str
    """Feature extractor (partitioner registry) when `partition.features` is not set."""
    read_rows: RowReader
    """The partition stage's input: the dataset (builtin or Parquet) as rows, how a shard of
    them is written and what a cluster's rows look like (stats)."""
    expert_recipe: Callable[[RunConfig, dict[str, Any]], ExpertRecipe]
    """The experts' architecture and objective, from the config and the partition's stats."""
    build_router: Callable[[RunConfig, Manifest, Console], tuple[dict[str, str], dict[str, Any]]]
    """Train (or describe) the router; returns its artifacts and the stage's extra fields."""
    combine: Combine
    """How the experts' outputs on their rows become the ensemble's output."""
    load_ensemble: Callable[[RunConfig, Manifest], tuple[Ensemble, list[dict[str, Any]]]]
    """The finished run's experts behind its router, bound to the engine with `combine`;
    and each expert's final meta.json."""
    evaluate: Callable[[RunConfig, Manifest], tuple[Report, Pictures]]
    """The held-out report and its pictures (sample grids), per strategy and per expert."""
    attach_baseline: Callable[[Report, Report], None]
    report_tables: Callable[[Report], list[Table]]
    report_png: Callable[[Report, Pictures], bytes]
    verbs: frozenset[str]
    """CLI verbs that apply to its runs: `sample` (images) or `generate` (text)."""
    models: tuple[str, ...] = ()
    """The registry's architectures made for its data, the default first: another
    modality's model in `experts.model` is refused by name before anything runs."""
    check_config: Callable[[RunConfig], None] = lambda config: None
    """Raise an InputError for what this modality cannot train or score, from the config
    alone (`islands validate`, and before a run starts)."""
    check_partition: Callable[[RunConfig, RunLayout, dict[str, Any]], None] = \
        lambda config, layout, stats: None
    """The same against the data once partitioned (its stats and held-out split), before
    the partition stage counts as done, so the config can still be fixed."""

    describe_data: Callable[[RunConfig], str] = lambda config: config.data.source
    """One line on the data, for `islands validate`: from Parquet footers or a folder's
    listing (never the rows); bad data raises an InputError naming the field or file."""

    load_router: Callable[[RunConfig, Manifest], Any] | None = None
    """The finished run's router alone (None with one expert): `islands serve` keeps the
    router in its ingress while the experts live on their islands."""
    serve_lane: Callable[..., Any] | None = None
    """`islands serve`: the lane that steps this modality's requests together on the engine
    (lane(ensemble, metas, config)); its `endpoint` names the API route it answers."""

    student_recipe: Callable[..., ExpertRecipe] | None = None
    """`islands distill`: (config, an expert's meta.json, --width or None, the teacher's
    Routing, the run's URL) -> the student's model and the objective that trains it on the
    ensemble's outputs; a bad width raises an InputError naming --width."""
    student_ensemble: Callable[[Any], Ensemble] | None = None
    """The distilled student as a one-expert Ensemble (sampled, generated, scored alike)."""

    def features(self, config: RunConfig) -> str:
        return config.partition.features or self.default_features
