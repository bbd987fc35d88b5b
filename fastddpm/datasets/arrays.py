"""Images stored as a uint8 array in a .npy or .npz file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .dataset import DatasetError, ImageDataset, PathLike, _oneline


def _to_nchw(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:  # N x H x W
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[3] in (1, 3):  # N x H x W x C (checked first: numpy/PIL convention)
            return arr.transpose(0, 3, 1, 2)
        if arr.shape[1] in (1, 3):  # N x C x H x W
            return arr
    raise DatasetError(
        f"cannot interpret array shape {arr.shape} in {path}: expected N×H×W, N×H×W×C or N×C×H×W with C = 1 or 3"
    )


def array_file(path: PathLike) -> ImageDataset:
    """Images from a .npy or .npz file, loaded with allow_pickle=False, with levels=256.

    From a .npz the array named "images" is used, else the only array; several arrays and none
    named "images" is an error. A .npz's "labels" array (integers [N]) gives the class labels. The array must be uint8 (floats are refused rather than guessing
    their range), laid out N×H×W (one channel), N×H×W×C or N×C×H×W with C = 1 or 3. The axis
    that is 1 or 3 decides the layout; if both the last and the second are, it is N×H×W×C.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise DatasetError(f"dataset path does not exist: {p}")
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise DatasetError(f"not a .npy/.npz file: {p}")
    try:
        if suffix == ".npy":
            arr, labels = np.load(p, allow_pickle=False), None
        else:
            with np.load(p, allow_pickle=False) as f:
                keys = list(f.files)
                labels = f["labels"] if "labels" in keys else None
                if "images" in keys:
                    key = "images"
                elif len(keys) == 1:
                    key = keys[0]
                elif not keys:
                    raise DatasetError(f"no arrays in {p}")
                else:
                    raise DatasetError(f"several arrays in {p} ({', '.join(keys)}) and none named 'images'")
                arr = f[key]
    except DatasetError:
        raise
    except Exception as e:  # bad zip, truncated file, object arrays, ...
        raise DatasetError(f"cannot read array file {p}: {_oneline(e)}") from e
    if not isinstance(arr, np.ndarray):
        raise DatasetError(f"cannot read array file {p}: not an array")
    if arr.dtype != np.uint8:
        raise DatasetError(f"array in {p} has dtype {arr.dtype}; only uint8 images (0..255) are supported")
    arr = _to_nchw(arr, p)
    if arr.shape[0] == 0:
        raise DatasetError(f"no images in {p}")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (arr.shape[0],) or labels.min() < 0):
        raise DatasetError(f"'labels' in {p} must be {arr.shape[0]} non-negative integers, one an image; got "
                           f"{labels.dtype} {labels.shape}")
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(arr)), levels=256, name=f"array:{p}", labels=labels)
