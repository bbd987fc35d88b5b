"""Sample quality: how close samples of the digits are to held-out digits.

`digit_quality(images)` quantizes samples to the digits' 17 levels (as the data are held),
takes their features in the shipped digit classifier (`classifier`), and compares them with
the features of the 297 held-out digits: the Fréchet distance of Gaussian fits (`frechet`,
Heusel et al. 2017) and precision/recall of k-NN manifolds (`manifold`, Kynkäänniemi et al.
2019). Beside every score it reports the floor: the same scores for the 1500 training digits,
real data the classifier was trained on, against the held-out ones.

The Fréchet distance is biased upwards by O(1/n) and precision/recall move with n too, so
scores are comparable only at equal n (it is in the result); the floor is at n = 1500, so
1500 samples give scores directly comparable with it.

For other data, `fastddpm.metrics.fid` computes FID in Inception-v3 features (the ``fid``
extra and a local weights file; nothing is downloaded).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..datasets import digits, quantize, to_float
from .classifier import DigitClassifier, load_digit_classifier
from .frechet import frechet_distance
from .manifold import precision_recall

__all__ = [
    "DigitClassifier",
    "digit_features",
    "digit_floor",
    "digit_quality",
    "frechet_distance",
    "load_digit_classifier",
    "precision_recall",
]

LEVELS = 17  # the digits' pixel values 0..16
SHAPE = (1, 8, 8)
REFERENCE = "digits/heldout"


def _check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"images must be a float tensor in [-1, 1] (codes: to_float(codes, 17)), got {got}")
    if images.ndim != 4 or tuple(images.shape[1:]) != SHAPE or len(images) < 2:
        raise ValueError(f"images must have shape [N, 1, 8, 8] with N >= 2, got {tuple(images.shape)}")
    lo, hi = images.min().item(), images.max().item()
    if not (-1 <= lo and hi <= 1):  # also false for NaN
        raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] "
                         "(clamp the samples of an unclipped sampler)")
    return images.detach().cpu()


def digit_features(images: torch.Tensor, model: DigitClassifier | None = None) -> torch.Tensor:
    """float64 [N, 64]: the classifier's features of ``images`` [N, 1, 8, 8] in [-1, 1], each first
    rounded to the nearest of the digits' 17 levels."""
    x = to_float(quantize(_check_images(images), LEVELS), LEVELS)
    return (load_digit_classifier() if model is None else model).features(x)


def digit_floor(model: DigitClassifier | None = None, k: int = 3) -> dict:
    """The scores of real data: the training split against the held-out split, in ``model``'s
    features (the shipped classifier's by default, computed once per process)."""
    if model is None:
        return dict(_shipped_floor(k))
    train, heldout = (digit_features(digits(s).tensor(), model) for s in ("train", "heldout"))
    precision, recall = precision_recall(heldout, train, k)
    return {"distance": frechet_distance(train, heldout), "precision": precision, "recall": recall, "n": len(train)}


@lru_cache(maxsize=None)
def _shipped_floor(k: int) -> tuple:
    return tuple(digit_floor(load_digit_classifier(), k).items())


@lru_cache(maxsize=1)
def _reference() -> torch.Tensor:
    return digit_features(digits("heldout").tensor())


def digit_quality(images: torch.Tensor, *, k: int = 3) -> dict:
    """How close ``images`` (float [N, 1, 8, 8] in [-1, 1], e.g. samples) are to the held-out digits.

    Returns ``distance`` (Fréchet distance in the classifier's features), ``precision`` and
    ``recall`` (k-NN manifolds), ``n``, and the floor, the same scores of the 1500 training
    digits: ``floor`` (the distance), ``floor_precision``, ``floor_recall``, ``floor_n``;
    ``reference`` names the held-out set. Compare scores only at equal n (module docstring).
    """
    fake, real = digit_features(images), _reference()
    precision, recall = precision_recall(real, fake, k)
    floor = digit_floor(k=k)
    return {
        "distance": frechet_distance(fake, real),
        "precision": precision,
        "recall": recall,
        "n": len(fake),
        "floor": floor["distance"],
        "floor_precision": floor["precision"],
        "floor_recall": floor["recall"],
        "floor_n": floor["n"],
        "reference": REFERENCE,
        "k": k,
    }
