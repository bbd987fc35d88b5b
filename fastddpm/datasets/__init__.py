"""Image datasets for fastddpm: small, held in memory, never downloaded.

Every loader returns an `ImageDataset`: uint8 intensity codes 0..levels-1, handed out as
float32 in [-1, 1] by x = v / (levels - 1) * 2 - 1. ``levels`` is 256 for 8-bit images and 17
for the digits (pixels 0..16); knowing it, a model reports exact discrete likelihoods
(bits/dim) and samples are quantized back to the data's own grid (`quantize`).

The sources:

- `digits(split)`: the 8x8 handwritten digits bundled in ``fastddpm/data/digits.npz`` (1797
  images, a fixed held-out split of 297; UCI data, CC BY 4.0, see `bundled`).
- `image_folder(path, size)`: every PNG/JPEG under a folder, made ``size`` x ``size``: RGB, or
  one channel when every image is grayscale; transparency composited on a background. It is
  decoded once, in parallel, into a memory-mapped uint8 cache (`cache`) that later runs reuse.
- `cifar10(path, split)`: CIFAR-10's pickled python batches, read by a numpy-only unpickler.
- `array_file(path)`: a .npy or .npz file of uint8 images.

`load_dataset(spec, size)` picks one of these from a single string (the CLI's --data) and
`load_heldout(spec, size)` the matching held-out set, if the source has one. Any problem with
the data (missing path, no images, corrupt file, wrong dtype or shape, unsafe pickle) raises
`DatasetError`, a ValueError whose message is one line naming the path and the problem.

Every set but an image folder is held in memory; a folder's codes are its cache's memory map, so
only the rows read are loaded (the trainer streams batches from it when the set is large,
`fastddpm.loader`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import validate
from .arrays import array_file
from .bundled import digits
from .cifar import CIFAR_TEST_FILES, _cifar_dir, cifar10
from .dataset import DatasetError, ImageDataset, quantize, to_float
from .folder import IMAGE_EXTENSIONS, _check_size, check_channels, decode_image, image_folder, parse_background

__all__ = [
    "DatasetError",
    "ImageDataset",
    "to_float",
    "quantize",
    "digits",
    "image_folder",
    "decode_image",
    "cifar10",
    "array_file",
    "load_dataset",
    "load_heldout",
    "is_image_folder",
    "IMAGE_EXTENSIONS",
]


# ---- one-string selection (the CLI's --data) -----------------------------------------------------


def _check_native_size(ds: ImageDataset, size: int | None, spec: str) -> ImageDataset:
    if size is not None:
        _, h, w = ds.shape
        if (h, w) != (size, size):
            raise DatasetError(
                f"dataset {spec} has {h}x{w} images and cannot be resized; size {size} was requested (omit it)"
            )
    return ds


def _check_folder_options(ds: ImageDataset, background: str, channels: int | None, spec: str) -> ImageDataset:
    if background != "white":
        raise DatasetError(f"background {background!r} applies to image folders only, not to {spec}")
    if channels is not None and channels != ds.shape[0]:
        raise DatasetError(f"channels {channels} applies to image folders only; {spec} has {ds.shape[0]} "
                           "channel(s)")
    return ds


def is_image_folder(spec) -> bool:
    """Whether `load_dataset` reads ``spec`` as an image folder (a folder without CIFAR-10 batches)."""
    if not isinstance(spec, (str, os.PathLike)) or spec == "digits":
        return False
    p = Path(os.path.expanduser(os.fspath(spec)))
    return p.is_dir() and _cifar_dir(p) is None


def load_dataset(spec: str | None = None, size: int | None = None, *, background: str = "white",
                 channels: int | None = None, cache_dir=None) -> ImageDataset:
    """The training set named by ``spec``.

    None or "digits" is the bundled digits' train split (write ./digits for a folder of that
    name); a folder holding CIFAR-10 batches, itself or in its cifar-10-batches-py subfolder,
    is CIFAR-10's train split; any other folder is an `image_folder`, for which ``size`` is
    required; a .npy or .npz file is an `array_file`. Only image folders are resized: for the
    other sources ``size`` may be omitted, and if given must equal the native size.
    ``background``, ``channels`` and ``cache_dir`` are `image_folder`'s; for the other sources
    a background other than white, or channels other than the source's, is an error.
    """
    validate.integer("image size", size, 1, optional=True)
    parse_background(background)
    check_channels(channels)
    if spec is None or spec == "digits":
        return _check_folder_options(_check_native_size(digits("train"), size, "digits"), background, channels, "digits")
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise DatasetError(f"invalid dataset spec: {spec!r}")
    p = Path(os.path.expanduser(os.fspath(spec)))
    if not p.exists():
        raise DatasetError(f"dataset path does not exist: {p}")
    if is_image_folder(p):
        return image_folder(p, _check_size(size, p), background=background, channels=channels, cache_dir=cache_dir)
    if p.is_dir() or p.suffix.lower() in (".npy", ".npz"):
        ds = cifar10(p, "train") if p.is_dir() else array_file(p)
        return _check_folder_options(_check_native_size(ds, size, str(p)), background, channels, str(p))
    if p.name.lower().endswith((".tar.gz", ".tgz", ".tar", ".zip")):
        raise DatasetError(f"archives are not read directly; extract {p} and pass the folder")
    raise DatasetError(
        f"unsupported dataset path {p}: expected 'digits', a folder of PNG/JPEG images, "
        f"a CIFAR-10 batches folder, or a .npz/.npy file"
    )


def load_heldout(spec: str | None = None, size: int | None = None) -> ImageDataset | None:
    """The held-out (evaluation) set matching ``load_dataset(spec, size)``: the digits'
    heldout split, or CIFAR-10's test split (None if the folder has no test_batch). Image
    folders and array files have no held-out split: None."""
    if spec is None or spec == "digits":
        return _check_native_size(digits("heldout"), size, "digits")
    p = Path(os.path.expanduser(os.fspath(spec)))
    if not p.exists():
        raise DatasetError(f"dataset path does not exist: {p}")
    if p.is_dir():
        d = _cifar_dir(p)
        if d is not None:
            if not (d / CIFAR_TEST_FILES[0]).is_file():
                return None
            return _check_native_size(cifar10(p, "test"), size, str(p))
    return None
