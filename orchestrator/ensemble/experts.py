"""Experts of a finished run, loaded from their verified final weights."""

from __future__ import annotations

import json

from safetensors.torch import load as load_tensors
from torch import nn

from orchestrator.state.manifest import Manifest
from worker.models import build_model


def load_expert(manifest: Manifest, expert: int) -> tuple[nn.Module, dict]:
    base = f"experts/expert-{expert}/final"
    meta = json.loads(manifest.read_verified(f"{base}/meta.json"))
    model = build_model(meta["model"], **meta["model_kwargs"])
    model.load_state_dict(load_tensors(manifest.read_verified(f"{base}/model.safetensors")))
    return model.eval(), meta


def load_experts(manifest: Manifest) -> tuple[list[nn.Module], list[dict]]:
    loaded = [load_expert(manifest, k) for k in manifest.experts]
    return [model for model, _ in loaded], [meta for _, meta in loaded]


def load_student(manifest: Manifest) -> tuple[nn.Module, dict]:
    """The model `islands distill` trained on the ensemble, from its verified weights."""
    meta = json.loads(manifest.read_verified("distill/meta.json"))
    model = build_model(meta["model"], **meta["model_kwargs"])
    model.load_state_dict(load_tensors(manifest.read_verified("distill/model.safetensors")))
    return model.eval(), meta
