"""Feature extractors, addressed by the name the YAML uses (`partition.features`).

Adding one is a class with `fit`/`transform`/`state` plus one line in EXTRACTORS.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from sklearn.decomposition import PCA

from runstore.errors import InputError


class FeatureExtractor(Protocol):
    def fit(self, images: np.ndarray) -> FeatureExtractor: ...
    def transform(self, images: np.ndarray) -> np.ndarray: ...
    def state(self) -> dict[str, torch.Tensor]: ...


class PixelPCA:
    """Flattened pixels in [0, 1], projected on their top principal components."""

    def __init__(self, components: int, seed: int) -> None:
        self.components = components
        self.seed = seed
        self.pca: PCA | None = None

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    def fit(self, images: np.ndarray) -> PixelPCA:
        flat = self._flat(images)
        components = min(self.components, flat.shape[0], flat.shape[1])
        self.pca = PCA(n_components=components, random_state=self.seed).fit(flat)
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        assert self.pca is not None, "fit first"
        return self.pca.transform(self._flat(images)).astype(np.float32)

    def state(self) -> dict[str, torch.Tensor]:
        assert self.pca is not None, "fit first"
        components = np.ascontiguousarray(self.pca.components_, dtype=np.float32)
        return {"mean": torch.from_numpy(self.pca.mean_.astype(np.float32)),
                "components": torch.from_numpy(components)}


def _dinov2(components: int, seed: int) -> FeatureExtractor:
    # The real extractor needs weights on local disk; nothing is downloaded at run time.
    raise InputError("partition.features", "'dinov2' needs local DINOv2 weights, which this "
                     "installation does not have; use 'pixels'")


EXTRACTORS = {
    "pixels": PixelPCA,
    "dinov2": _dinov2,
}


def make_extractor(name: str, components: int, seed: int) -> FeatureExtractor:
    if name not in EXTRACTORS:
        raise InputError("partition.features",
                         f"unknown extractor {name!r}; expected one of {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name](components, seed)
