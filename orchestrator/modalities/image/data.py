"""A split of the run's image shards, with each row's cluster: all of it or a seeded sample
(runstore/split_sample.py), kept as uint8 and moved to model space a batch at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runstore.layout import RunLayout
from runstore.shards import read_image_split
from worker.flow import to_model_space


@dataclass
class LabelledImages:
    x0: torch.Tensor  # [N, C, H, W] in [-1, 1]
    cluster: torch.Tensor  # [N]
    labels: torch.Tensor | None = None  # [N] the dataset's own labels, when it has them


@dataclass
class SplitImages:
    """uint8 pixels (a quarter of float32); `x0(index)` is model space for those rows,
    the same values as converting the whole split first."""

    pixels: torch.Tensor  # uint8 [N, H, W, C]
    cluster: torch.Tensor  # int64 [N]
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[-1])

    def x0(self, index: torch.Tensor | slice) -> torch.Tensor:
        return to_model_space(self.pixels[index])

    def labelled(self, index: torch.Tensor | slice | None = None) -> LabelledImages:
        index = slice(None) if index is None else index
        labels = None if self.labels is None else self.labels[index]
        return LabelledImages(self.x0(index), self.cluster[index], labels)


def read_split(layout: RunLayout, clusters: int, split: str, rows: int | None = None,
               seed: int = 0) -> SplitImages:
    """Every cluster's rows of a split (or a seeded sample of at most `rows`), ordered by
    dataset row."""
    table, cluster = read_image_split(layout, clusters, split, rows, seed)
    labels = None if table.labels is None else torch.from_numpy(table.labels)
    return SplitImages(torch.from_numpy(table.images), torch.from_numpy(cluster), labels)


def load_split(layout: RunLayout, clusters: int, split: str, rows: int | None = None,
               seed: int = 0) -> LabelledImages:
    """A split (or its seeded sample) in model space."""
    return read_split(layout, clusters, split, rows, seed).labelled()
