"""Precision and recall of generated samples (Kynkäänniemi et al. 2019, "Improved Precision and
Recall Metric for Assessing Generative Models").

Each feature set estimates its manifold as the union of balls around its points, each ball's
radius the distance to the point's k-th nearest neighbour in the same set (their eq. (2)).
Precision is the fraction of generated points inside the real manifold, recall the fraction of
real points inside the generated one (eq. (1) and (3)). Distances are exact Euclidean ones in
float64, taken in blocks of rows so memory stays O(block · N).
"""

from __future__ import annotations

import torch

from .. import validate
from .frechet import check_features

BLOCK = 1024  # rows of the distance matrix held at once


def _distances(a: torch.Tensor, b: torch.Tensor):
    """Blocks of rows of the [len(a), len(b)] Euclidean distance matrix, in order."""
    for lo in range(0, len(a), BLOCK):
        yield torch.cdist(a[lo : lo + BLOCK], b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of ``x`` [N, D] (itself excluded)."""
    return torch.cat([d.topk(k + 1, dim=1, largest=False).values[:, k] for d in _distances(x, x)])


def inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each of ``points`` lies in some ball (centres, radii): bool [len(points)]."""
    return torch.cat([(d <= radii).any(dim=1) for d in _distances(points, centres)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of features ``fake`` [M, D] against ``real`` [N, D] with k-NN balls."""
    validate.integer("k", k, 1)
    real, fake = check_features("real", real, k + 1), check_features("fake", fake, k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must have the same feature size, got {real.shape[1]} and {fake.shape[1]}")
    precision = inside(fake, real, knn_radii(real, k)).double().mean().item()
    recall = inside(real, fake, knn_radii(fake, k)).double().mean().item()
    return precision, recall
