"""An expert's weights at any recorded step: its snapshots (`experts.snapshot_at`) and its
final weights, EMA or raw, read through the manifest's verified reads."""

from __future__ import annotations

import json
import re
from typing import Literal

from safetensors.torch import load as load_tensors
from torch import nn

from orchestrator.state.manifest import Manifest
from runstore.errors import InputError
from worker.models import build_model

Weights = Literal["ema", "raw"]
# File of each kind of weights: in a snapshot folder, and in the final folder.
SNAPSHOT_FILES = {"ema": "ema.safetensors", "raw": "model.safetensors"}
FINAL_FILES = {"ema": "model.safetensors", "raw": "raw.safetensors"}


def expert_folder(manifest: Manifest, expert: int) -> str:
    """The expert's folder relative to the run, as the manifest lists its artifacts."""
    return manifest.layout.expert(expert).removeprefix(manifest.layout.root).strip("/")


def snapshot_steps(manifest: Manifest, expert: int) -> list[int]:
    """Steps at which the manifest lists a complete snapshot of `expert`."""
    pattern = re.compile(re.escape(expert_folder(manifest, expert))
                         + r"/snapshots/step-(\d+)/meta\.json")
    listed = manifest.expert(expert)["artifacts"]
    return sorted(int(found[1]) for path in listed if (found := pattern.fullmatch(path)))


def load_expert_at(manifest: Manifest, expert: int, step: int | None = None,
                   weights: Weights = "ema") -> nn.Module:
    """The expert as it was at `step` (None: its final weights), in eval mode."""
    if weights not in SNAPSHOT_FILES:
        raise InputError("weights", f"expected 'ema' or 'raw', got {weights!r}")
    base = expert_folder(manifest, expert)
    if step is None:
        folder, name = f"{base}/final", FINAL_FILES[weights]
    else:
        if step not in snapshot_steps(manifest, expert):
            raise InputError(f"{base}/snapshots", f"no snapshot at step {step} in manifest.json"
                             f" (have {snapshot_steps(manifest, expert)})")
        folder, name = f"{base}/snapshots/step-{step:08d}", SNAPSHOT_FILES[weights]
    meta = json.loads(manifest.read_verified(f"{folder}/meta.json"))
    model = build_model(meta["model"], **meta["model_kwargs"])
    model.load_state_dict(load_tensors(manifest.read_verified(f"{folder}/{name}")))
    return model.eval()
