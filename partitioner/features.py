"""Feature extractors, addressed by the name the YAML uses (`partition.features`).

An extractor fits on the training rows, transforms any rows (images as uint8 arrays,
texts as strings), and saves its state so routing can embed new inputs later the same
way. Adding one is a class here (or in its own module) plus one line in EXTRACTORS.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sklearn.decomposition import PCA

from runstore.errors import InputError


class FeatureExtractor(Protocol):
    modality: ClassVar[str]

    def fit(self, rows: Any) -> FeatureExtractor: ...
    def transform(self, rows: Any) -> np.ndarray: ...
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]: ...


class PixelPCA:
    """Flattened pixels in [0, 1], projected on their top principal components."""

    modality = "image"

    def __init__(self, components: int, seed: int) -> None:
        self.components = components
        self.seed = seed
        self.mean: np.ndarray | None = None
        self.basis: np.ndarray | None = None

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    def fit(self, images: np.ndarray) -> PixelPCA:
        flat = self._flat(images)
        components = min(self.components, flat.shape[0], flat.shape[1])
        pca = PCA(n_components=components, random_state=self.seed).fit(flat)
        self.mean = pca.mean_.astype(np.float32)
        self.basis = np.ascontiguousarray(pca.components_, dtype=np.float32)
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        assert self.basis is not None, "fit first"
        return (self._flat(images) - self.mean) @ self.basis.T

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        assert self.basis is not None, "fit first"
        return ({"mean": torch.from_numpy(self.mean), "components": torch.from_numpy(self.basis)},
                {"components": str(self.components), "seed": str(self.seed)})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> PixelPCA:
        extractor = cls(int(meta["components"]), int(meta["seed"]))
        extractor.mean = tensors["mean"].numpy()
        extractor.basis = tensors["components"].numpy()
        return extractor


def _text_extractors() -> dict[str, Any]:
    from partitioner.text_features import MiniLMEmbedding, TfidfSVD

    return {"tfidf": TfidfSVD, "minilm": MiniLMEmbedding}


def _pretrained_extractors() -> dict[str, Any]:
    from partitioner.pretrained_features import ClipImageFeatures, DinoV2Features

    return {"dinov2": DinoV2Features, "clip": ClipImageFeatures}


EXTRACTORS: dict[str, Any] = {
    "pixels": PixelPCA,
    **_pretrained_extractors(),
    **_text_extractors(),
}


def register_extractor(name: str, extractor: Any) -> None:
    """Add an extractor class; a modality outside this package registers its own here."""
    EXTRACTORS[name] = extractor


def extractor_class(name: str) -> Any:
    if name not in EXTRACTORS:
        raise InputError("partition.features",
                         f"unknown extractor {name!r}; expected one of {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]


def make_extractor(name: str, components: int, seed: int, modality: str,
                   model_path: str | None = None) -> Any:
    """Extractor `name` for data of `modality`; each extractor declares the one it reads.
    `model_path` goes to the extractors that read a pretrained model (`reads_model`)."""
    cls = extractor_class(name)
    if cls.modality != modality:
        by_modality: dict[str, list[str]] = {}
        for extractor, each in EXTRACTORS.items():
            by_modality.setdefault(each.modality, []).append(extractor)
        matching = by_modality.get(modality, [])
        raise InputError("partition.features", f"{name!r} extracts {cls.modality} features but "
                         f"the data is {modality}; expected one of {', '.join(matching)}")
    if getattr(cls, "reads_model", False):
        return cls(components, seed, model_path=model_path)
    if model_path is not None:
        readers = [each for each, reader in EXTRACTORS.items()
                   if getattr(reader, "reads_model", False)]
        raise InputError("partition.model_path", f"is read only by the features "
                         f"{', '.join(readers)}; features {name!r} take no model")
    return cls(components, seed)


def save_extractor_state(name: str, extractor: Any) -> bytes:
    """safetensors bytes; the description goes in one metadata key because the format's
    metadata map has no fixed order, and one key keeps the file's sha256 reproducible."""
    tensors, meta = extractor.state()
    meta = {**meta, "extractor": name}
    return save_tensors(tensors or {"empty": torch.zeros(0)},
                        metadata={"islands": json.dumps(meta, sort_keys=True)})


def load_extractor(data: bytes) -> Any:
    meta = json.loads(safetensors_metadata(data)["islands"])
    return extractor_class(meta["extractor"]).from_state(load_tensors(data), meta)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    # The format opens with an 8-byte little-endian header length, then a JSON header.
    header_length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_length]).get("__metadata__", {})


