"""c-BTM router: embed a context with the partition's own feature pipeline and weight
expert k by softmax(-|e - c_k|^2 / T) over the cluster centres c_k."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load as load_tensors

from orchestrator.modalities.text import DEFAULT_FEATURES
from orchestrator.state.config import RunConfig
from orchestrator.state.manifest import Manifest
from partitioner.features import load_extractor
from runstore import storage


class CentroidRouter:
    def __init__(self, extractor: object, centroids: np.ndarray, temperature: float) -> None:
        self.extractor = extractor
        self.centroids = torch.from_numpy(centroids)
        self.temperature = temperature

    @property
    def clusters(self) -> int:
        return len(self.centroids)

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        embedded = torch.from_numpy(self.extractor.transform(list(texts)))
        distances = torch.cdist(embedded, self.centroids) ** 2
        return torch.softmax(-distances / self.temperature, dim=1)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.probabilities(texts)

    @classmethod
    def from_run(cls, manifest: Manifest, temperature: float) -> CentroidRouter:
        extractor = load_extractor(manifest.read_verified("partition/features.safetensors"))
        centroids = load_tensors(manifest.read_verified("partition/centroids.safetensors"))
        return cls(extractor, centroids["centroids"].numpy(), temperature)


def build_router(config: RunConfig, manifest: Manifest,
                 console: Console) -> tuple[dict[str, str], dict[str, Any]]:
    """The router stage for text: c-BTM routes by distance to the partition's centroids,
    so there is nothing to train; meta.json records how it routes."""
    meta_url = storage.join(manifest.layout.router, "meta.json")
    features = config.partition.features or DEFAULT_FEATURES
    sha = storage.write_json(meta_url, {"kind": "centroid", "features": features,
                                        "temperature": config.router.temperature})
    console.print(f"router: c-BTM centroid routing, temperature {config.router.temperature}")
    return {"router/meta.json": sha}, {}
