"""Fréchet distance between image sets in the feature space of a small classifier trained on
the run's own training split (an FID for datasets that Inception knows nothing about)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runstore.errors import InputError
from runstore.layout import RunLayout
from runstore.shards import read_image_split
from runstore.split_sample import FRECHET_ROWS
from worker.flow import to_model_space, to_pixels


def _psd_root(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0.0))) @ vectors.T


def frechet_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray,
                       cov_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2)): the Fréchet (2-Wasserstein)
    distance between two Gaussians."""
    # tr (A B)^(1/2) = tr (A^(1/2) B A^(1/2))^(1/2), a symmetric form: eigenvalues stay real
    # and the result stays finite when features have dead (constant) dimensions, where a
    # general matrix square root of the singular A B is unstable.
    root_a = _psd_root(cov_a)
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b)
                 - 2.0 * np.sqrt(middle.clip(min=0.0)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to feature rows `a` and `b`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return frechet_from_stats(a.mean(0), np.cov(a, rowvar=False),
                              b.mean(0), np.cov(b, rowvar=False))


def bootstrap_distances(a: np.ndarray, b: np.ndarray, reps: int = 30,
                        seed: int = 0) -> np.ndarray:
    """The distance over `reps` resamplings (with replacement) of both sets: its spread is
    how much of a difference between two distances is sampling noise."""
    rng = np.random.default_rng(seed)
    return np.array([frechet_distance(a[rng.integers(0, len(a), len(a))],
                                      b[rng.integers(0, len(b), len(b))])
                     for _ in range(reps)])


def bootstrap_sd(a: np.ndarray, b: np.ndarray, reps: int = 30, seed: int = 0) -> float:
    """Standard deviation of the distance over resamplings of both sets."""
    return float(np.std(bootstrap_distances(a, b, reps, seed), ddof=1))


class DigitClassifier(nn.Module):
    """Two conv blocks and a small embedding layer; the embedding (before dropout and the
    class head) is the feature space of the distance."""

    def __init__(self, image_channels: int, classes: int, width: int = 32,
                 features: int = 64) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(image_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(2 * width * 16, features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.convs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def labelled_images(layout: RunLayout, clusters: int, split: str,
                    rows: int | None = FRECHET_ROWS,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's labelled images in model space [-1, 1] with their dataset labels, ordered
    by dataset row (the same rows whatever the partition): a seeded sample of at most
    `rows` (None: all), unlabelled rows (label < 0) left out."""
    table, _ = read_image_split(layout, clusters, split, rows, seed)
    if table.labels is None:
        raise InputError(layout.shard(0, split), "no label column: the classifier for the "
                         "Fréchet distance needs labels (data.label_column)")
    known = np.flatnonzero(table.labels >= 0)
    if len(known) == 0:
        raise InputError(layout.shard(0, split), "every row is unlabelled (label < 0); the "
                         "classifier for the Fréchet distance needs labels")
    if len(known) < len(table.labels):
        return (to_model_space(torch.from_numpy(table.images[known])),
                torch.from_numpy(table.labels[known]))
    return to_model_space(torch.from_numpy(table.images)), torch.from_numpy(table.labels)


def _shifted(x: torch.Tensor, generator: torch.Generator, most: int = 2) -> torch.Tensor:
    """The batch moved by up to `most` pixels each way (background fills the gap): with a few
    thousand digits this is what lifts held-out accuracy from about 0.95 to 0.97."""
    padded = F.pad(x, (most, most, most, most), value=-1.0)
    dx, dy = torch.randint(0, 2 * most + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_classifier(x: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int = 8,
                     batch: int = 64, lr: float = 3e-3) -> DigitClassifier:
    torch.manual_seed(seed)
    model = DigitClassifier(x.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(x) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(batch):
            if len(index) < 2:  # batch norm needs two rows
                continue
            loss = F.cross_entropy(model(_shifted(x[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(part).argmax(1) for part in x.split(batch)])


@torch.no_grad()
def embed(model: DigitClassifier, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Features of images in model space; generated ones are first rounded to pixels as a
    stored image would be, so real and generated sets go through the same path."""
    x = to_model_space(to_pixels(x))
    return torch.cat([model.features(part) for part in x.split(batch)]).double().numpy()
