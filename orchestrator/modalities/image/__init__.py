"""Images (Decentralized Diffusion Models): flow-matching U-Net experts, a router trained to
classify the cluster of a noisy image, the router-weighted sum of expert velocities."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.modalities.spec import ModalitySpec, lazy
from orchestrator.state.config import RunConfig
from partitioner.builtins import BUILTIN_SHAPES
from runstore.errors import InputError

if TYPE_CHECKING:
    from orchestrator.control.expert_specs import ExpertRecipe
    from orchestrator.ensemble import Ensemble
    from orchestrator.state.manifest import Manifest
    from runstore.layout import RunLayout

MODELS = ("unet",)
PRETRAINED_FEATURES = ("dinov2", "clip")
"""Extractors that embed images with a pretrained model (partitioner/pretrained_features.py):
they need `partition.model_path`, checked here so `islands validate` says so."""


def check_unet_depth(config: RunConfig, image_shape: Any, images: str) -> None:
    """Each U-Net level after the first halves the feature map (a stride-2 convolution); a
    level that has no 2 pixels left to halve computes on a 1x1 map, which only costs. It is
    refused before training, naming the images (`images`) it was checked against."""
    cfg = config.experts
    if (cfg.model or MODELS[0]) != "unet":
        return
    height, width = int(image_shape[0]), int(image_shape[1])
    side = -(-min(height, width) // cfg.patch)  # the U-Net pads to a multiple of the patch
    fits, left = 1, side
    while left >= 2:
        left, fits = -(-left // 2), fits + 1
    levels = len(cfg.channel_mult)
    if levels > fits:
        raise InputError("experts.channel_mult", f"{levels} levels halve the image "
                         f"{levels - 1} times, but {images} are {height}x{width}, "
                         f"{side} pixels across after experts.patch {cfg.patch}: expected "
                         f"at most {fits} levels (each halving needs 2 pixels), such as "
                         f"{list(cfg.channel_mult[:fits])}")


def check_config(config: RunConfig) -> None:
    """A builtin's image size is known before it is read: check the U-Net against it; and
    pretrained features name their model."""
    features = config.partition.features
    if features in PRETRAINED_FEATURES and not config.partition.model_path:
        raise InputError("partition.model_path", f"features {features!r} need a model: "
                         "expected a local model folder or a hub id in the local Hugging "
                         "Face cache (nothing is downloaded)")
    name = config.data.source.removeprefix("builtin:")
    if config.data.source.startswith("builtin:") and name in BUILTIN_SHAPES:
        check_unet_depth(config, BUILTIN_SHAPES[name], f"the images of {config.data.source}")


def describe_data(config: RunConfig) -> str:
    data = config.data
    return _describe(data.source, data.split, data.image_column, data.label_column)


def check_partition(config: RunConfig, layout: RunLayout, stats: dict[str, Any]) -> None:
    check_unet_depth(config, stats["image_shape"], f"the images of {config.data.source}")


def expert_recipe(config: RunConfig, stats: dict[str, Any]) -> ExpertRecipe:
    from orchestrator.control.expert_specs import ExpertRecipe

    cfg = config.experts
    return ExpertRecipe(
        model=cfg.model or MODELS[0],
        model_kwargs={"image_channels": stats["image_shape"][-1], "channels": cfg.channels,
                      "channel_mult": list(cfg.channel_mult), "patch": cfg.patch},
        objective="flow")


def ensemble_of(config: RunConfig, manifest: Manifest) -> tuple[Ensemble, list[dict]]:
    from orchestrator.modalities.image.sampling import load_ensemble

    return load_ensemble(manifest)


def router_of(config: RunConfig, manifest: Manifest) -> object:
    from orchestrator.modalities.image.sampling import load_classifier_router

    return load_classifier_router(manifest, config.clusters)


_HERE = "orchestrator.modalities.image"
_describe = lazy("partitioner.image_datasets:describe_image_source")


spec = ModalitySpec(
    name="image", default_features="pixels",
    read_rows=lazy("partitioner.image_datasets:read_image_rows"),
    expert_recipe=expert_recipe, build_router=lazy(f"{_HERE}.router:build_router"),
    combine=lazy(f"{_HERE}.sampling:add_velocities"), load_ensemble=ensemble_of,
    evaluate=lazy(f"{_HERE}.evaluation:evaluate"),
    attach_baseline=lazy(f"{_HERE}.evaluation:attach_baseline"),
    report_tables=lazy(f"{_HERE}.evaluation:report_tables"),
    report_png=lazy(f"{_HERE}.evaluation:report_png"),
    verbs=frozenset({"sample"}), models=MODELS, check_config=check_config,
    check_partition=check_partition, describe_data=describe_data, load_router=router_of,
    student_recipe=lazy(f"{_HERE}.distill:student_recipe"),
    student_ensemble=lazy(f"{_HERE}.distill:load_student_ensemble"),
    serve_lane=lazy(f"{_HERE}.serving:ImageLane"))
