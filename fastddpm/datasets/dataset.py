"""The image set every loader returns, and the mapping of its codes to floats.

A set is held as uint8 intensity codes 0..levels-1; a model sees them as float32 in [-1, 1],
x = v / (levels - 1) * 2 - 1, and `quantize` maps samples back to the codes. `DatasetError` is
the one error a loader raises for bad data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

PathLike = str | os.PathLike[str]


class DatasetError(ValueError):
    """A dataset could not be loaded. The message is one line naming the path and the problem
    (e.g. "dataset path does not exist: /x/y"), fit to print as it is."""


def _oneline(exc: BaseException) -> str:
    """The exception's message on one line (its type's name if it has none), for use in messages."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ---- value mapping -------------------------------------------------------------------------------


def to_float(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes 0..levels-1 as float32 in [-1, 1]: v / (levels - 1) * 2 - 1."""
    return codes.to(torch.float32) / (levels - 1) * 2 - 1


def quantize(x: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """The inverse of `to_float`: floats in [-1, 1] (clamped) to the nearest uint8 code
    0..levels-1. levels=256 gives ordinary 8-bit pixels for a PNG, whatever the data's levels."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in 2..256, got {levels}")
    v = torch.round((x.to(torch.float32).clamp(-1, 1) + 1) / 2 * (levels - 1))
    return v.to(torch.uint8)


# ---- the dataset ---------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """An image set: ``codes`` is uint8 [N, C, H, W] with values 0..levels-1, in memory or, for an
    image folder, the memory map of its decoded cache (rows are read when indexed).

    ``levels`` is 256 for 8-bit images and 17 for the digits; ``name`` describes the set (e.g.
    "digits/train"); ``labels`` is int64 [N] where the source has class labels (digits,
    CIFAR-10, a .npz's "labels", an image folder's subfolders), else None, and ``classes`` their
    names (label k is ``classes[k]``; by default "0", "1", ...). ``ds[i]`` is one image, float32 [C, H, W] in [-1, 1], without its
    label, so the set works with a DataLoader; `tensor` gives the whole set at once, as the
    small sets are trained from memory (larger ones are streamed, `fastddpm.loader`).
    """

    def __init__(
        self,
        codes: torch.Tensor | np.ndarray,
        levels: int = 256,
        name: str = "",
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
    ):
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(np.ascontiguousarray(codes))
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            raise TypeError("ImageDataset needs a uint8 tensor [N, C, H, W]")
        if codes.ndim != 4:
            raise ValueError(f"ImageDataset needs [N, C, H, W], got shape {tuple(codes.shape)}")
        if not 2 <= int(levels) <= 256:
            raise ValueError(f"levels must be in 2..256, got {levels}")
        levels = int(levels)
        if codes.numel() and levels < 256 and int(codes.max()) > levels - 1:
            raise ValueError(f"values up to {int(codes.max())} exceed levels-1 = {levels - 1}")
        self.codes = codes.contiguous()
        self.levels = levels
        self.name = name
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
            if labels.shape[0] != codes.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for {codes.shape[0]} images")
            if labels.numel() and int(labels.min()) < 0:
                raise ValueError(f"labels must be non-negative class indices, got {int(labels.min())}")
            count = int(labels.max()) + 1 if labels.numel() else 0
            classes = [str(k) for k in range(count)] if classes is None else [str(c) for c in classes]
            if len(classes) < count:
                raise ValueError(f"{len(classes)} class names for labels up to {count - 1}")
        elif classes is not None:
            raise ValueError("class names were given without labels")
        self.labels, self.classes = labels, classes

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return to_float(self.codes[index], self.levels)

    @property
    def shape(self) -> tuple:
        """(C, H, W) of one image."""
        return tuple(self.codes.shape[1:])

    def tensor(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The whole set as float32 [N, C, H, W] in [-1, 1]: a new tensor each call, on
        ``device`` if given."""
        codes = self.codes if device is None else self.codes.to(device)
        return to_float(codes, self.levels)

    def __repr__(self) -> str:
        c, h, w = self.shape
        return f"ImageDataset({self.name!r}, n={len(self)}, shape=({c}, {h}, {w}), levels={self.levels})"
