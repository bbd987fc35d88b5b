"""Sample quality: how close samples of the digits are to the real digits.

`digit_quality(images)` quantizes samples to the digits' 17 levels (as the data are held),
takes their features in the shipped digit classifier (`classifier`), and compares them with
the features of the 1500 training digits, the data the model learned (as Ho et al. 2020 score
FID against CIFAR-10's training set): the Fréchet distance of Gaussian fits (`frechet`,
Heusel et al. 2017) and precision/recall of k-NN manifolds (`manifold`, Kynkäänniemi et al.
2019). Beside every score it reports the floor: the same scores of the 297 held-out digits,
real digits that neither the model nor the classifier saw, as samples are.

The Fréchet distance is biased upwards by O(1/n) (at 297 images by about 4 in these features,
at 1500 by about 1) and recall moves with n too, so scores compare only at equal n. Hence two
sets of scores: those of all n samples, to compare samplers and models with each other (at
n = 1500 one draw's distance varies by about ±0.2–0.5 from seed to seed), and the means over
disjoint sets of 297 samples, to compare with the floor (``*_at_floor_n``). A model that
reproduced its training digits would score below the floor: it is the floor of a model that
generalises.

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
REFERENCE = "digits/train"  # what samples are compared with; the held-out digits are the floor


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
    """The scores of unseen real data: the held-out split against the training split, in
    ``model``'s features (the shipped classifier's by default, computed once per process)."""
    if model is None:
        return dict(_shipped_floor(k))
    train, heldout = (digit_features(digits(s).tensor(), model) for s in ("train", "heldout"))
    return _scores(heldout, train, k)


@lru_cache(maxsize=None)
def _shipped_floor(k: int) -> tuple:
    return tuple(digit_floor(load_digit_classifier(), k).items())


@lru_cache(maxsize=1)
def _reference() -> torch.Tensor:
    return digit_features(digits("train").tensor())


def _scores(fake: torch.Tensor, real: torch.Tensor, k: int) -> dict:
    precision, recall = precision_recall(real, fake, k)
    return {"distance": frechet_distance(fake, real), "precision": precision, "recall": recall, "n": len(fake)}


def digit_quality(images: torch.Tensor, *, k: int = 3) -> dict:
    """How close ``images`` (float [N, 1, 8, 8] in [-1, 1], e.g. samples) are to the training digits.

    Returns ``distance`` (Fréchet distance in the classifier's features), ``precision`` and
    ``recall`` (k-NN manifolds) of all ``n`` images; the floor, the same scores of the held-out
    digits: ``floor`` (the distance), ``floor_precision``, ``floor_recall``, ``floor_n`` (297);
    and the images' scores at the floor's n, means over ``sets_at_floor_n`` disjoint sets of
    ``floor_n`` images: ``distance_at_floor_n``, ``precision_at_floor_n``,
    ``recall_at_floor_n`` (None when n < floor_n). ``reference`` names the training split.
    Compare scores only at equal n (module docstring).
    """
    fake, real = digit_features(images), _reference()
    scores = _scores(fake, real, k)
    floor = digit_floor(k=k)
    sets = [_scores(part, real, k) for part in fake.split(floor["n"]) if len(part) == floor["n"]]
    at_floor_n = {f"{name}_at_floor_n": sum(s[name] for s in sets) / len(sets) if sets else None
                  for name in ("distance", "precision", "recall")}
    return {
        **scores,
        "floor": floor["distance"],
        "floor_precision": floor["precision"],
        "floor_recall": floor["recall"],
        "floor_n": floor["n"],
        **at_floor_n,
        "sets_at_floor_n": len(sets),
        "reference": REFERENCE,
        "k": k,
    }
