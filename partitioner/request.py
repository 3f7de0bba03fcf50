"""What the partition stage is asked to do, and the dataset rows it works on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # k-means (scikit-learn) loads only where the stage runs
    from partitioner.centroids import KMeansSpec


@dataclass(frozen=True)
class PartitionRequest:
    source: str
    storage: str
    image_column: str
    label_column: str | None
    heldout_fraction: float
    max_rows: int | None
    clusters: int
    features: str
    pca_components: int
    balance: bool
    balance_eps: float
    kmeans_init: int
    kmeans_iters: int
    seed: int
    read_rows: Callable[[PartitionRequest], Any]
    """Reads the dataset as its modality does: a RowSource read lazily
    (partitioner/row_source.py), or `Rows` held in memory (below)."""
    modality: str = "image"
    text_column: str = "text"
    sample_rows: int | None = None
    kmeans: KMeansSpec | None = None
    """Fitted on a sample of `kmeans.sample_rows` training rows (faiss or sklearn, optionally
    hierarchical, balanced by capacity prices), then every row assigned in batches; None: a
    flat fit on the stage's default sample. Its clusters and seed are the request's;
    balance_eps is set from `balance`."""
    model_path: str | None = None
    """The pretrained model of features that read one (dinov2, clip): a local folder, or a
    hub id in the local Hugging Face cache."""
    method: str = "kmeans"
    """kmeans: as above; random: balanced random parts (train and held-out rows alike), the
    baseline that shows what clustering is worth."""
    split: str | None = None
    """The split to read of a source holding several (Hugging Face split files)."""
    channels: int | None = None
    """Images: 1 or 3 channels; None: as the data is (one kind only)."""
    image_size: int | None = None
    """Images: resized to this square side by `resize`; None: as the data is."""
    resize: str = "center_crop"
    text_unit: str = "line"
    """Text files: a document per line, or per file."""
    ray_address: str | None = None
    """A Ray cluster (`islands.address`): the assignment pass runs there as one task per
    piece; None: here. A Ray session already running in this process is used as it is."""


@dataclass
class Rows:
    """A dataset held in memory (a modality may return this instead of a RowSource):
    `items` is what the extractor reads, `write(url, ids)` stores a shard of the rows `ids`
    and returns its sha256, `describe(ids, assignment, clusters)` summarises each cluster's
    rows for stats.json (label histograms, top languages)."""

    source: str
    count: int
    items: Any  # uint8 [N, H, W, C] images, or a list of texts
    stats: dict[str, Any]
    write: Callable[[str, np.ndarray], str]
    describe: Callable[[np.ndarray, np.ndarray, int], dict[str, Any]]

    def take(self, ids: np.ndarray) -> Any:
        return self.items[ids] if isinstance(self.items, np.ndarray) else \
            [self.items[i] for i in ids]


RowReader = Callable[[PartitionRequest], Any]  # a modality's way to read its dataset: a
# RowSource (partitioner/row_source.py) or Rows
