"""The 8x8 handwritten digits bundled with fastddpm, in ``fastddpm/data/digits.npz``.

1797 images with labels, pixels 0..16 (so levels = 17), and a fixed held-out split of 297.
This is scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits"
data set (E. Alpaydin, C. Kaynak, 1998), licensed under CC BY 4.0:
https://doi.org/10.24432/C50P49
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import numpy as np

from .dataset import DatasetError, ImageDataset, _oneline


def _digits_bytes() -> bytes:
    try:
        return (resources.files("fastddpm") / "data" / "digits.npz").read_bytes()
    except (ModuleNotFoundError, TypeError, AttributeError):  # pragma: no cover
        # e.g. an unusual import setup: fall back to the file in the source tree
        return (Path(__file__).resolve().parents[1] / "data" / "digits.npz").read_bytes()


def digits(split: str = "train") -> ImageDataset:
    """The bundled digits, [N, 1, 8, 8] with levels=17 and labels: split "train" (1500
    images), "heldout" (the fixed 297) or "all" (1797)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"digits split must be 'train', 'heldout' or 'all', got {split!r}")
    try:
        with np.load(io.BytesIO(_digits_bytes()), allow_pickle=False) as f:
            images, labels, heldout = f["images"], f["labels"], f["heldout"].astype(bool)
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"cannot read bundled digits data: {_oneline(e)}") from e
    if split == "train":
        keep = ~heldout
    elif split == "heldout":
        keep = heldout
    else:
        keep = np.ones_like(heldout)
    return ImageDataset(images[keep][:, None], levels=17, name=f"digits/{split}", labels=labels[keep])
