"""Folders of PNG/JPEG images, made square: the file list, the decoding of one image, and the
folder's channels. `image_folder` reads a folder through its decoded cache (`cache`)."""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import cache
from .dataset import DatasetError, ImageDataset, PathLike, _oneline

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
# PIL's modes of one-channel images: bilevel, 8-bit, 8-bit with alpha, 16/32-bit integer, float
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})  # 16-bit PNGs open as I;16 (I in older PILs)


def parse_background(background: str) -> tuple[int, int, int]:
    """The RGB colour transparent pixels are composited on: "white", "black" or "#rrggbb"."""
    if isinstance(background, str):
        if background in BACKGROUNDS:
            return BACKGROUNDS[background]
        if re.fullmatch(r"#[0-9a-fA-F]{6}", background):
            return tuple(int(background[i : i + 2], 16) for i in (1, 3, 5))
    raise ValueError(f"background must be white, black or #rrggbb, got {background!r}")


def check_channels(channels: int | None) -> int | None:
    """``channels`` if it is 1, 3 or None (None: 1 when every image of the folder is grayscale)."""
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels not in (1, 3)):
        raise ValueError(f"channels must be 1, 3 or null (null: 1 when every image is grayscale), got {channels!r}")
    return channels


def _list_images(root: Path) -> list[str]:
    """The image files under ``root``, recursive, as "/"-separated paths relative to it, sorted by
    their parts. Hidden files and folders (a name starting with ".", e.g. macOS's ``._x.png``) are
    skipped. Plain strings: a million Paths would take seconds to make and sort."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        folder = os.path.relpath(dirpath, root)
        parts = () if folder == "." else tuple(folder.split(os.sep))
        found += [(*parts, fn) for fn in filenames if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS)]
    return ["/".join(parts) for parts in sorted(found)]


# ---- one image -----------------------------------------------------------------------------------


def decode_image(path: PathLike, size: int, background: str = "white", channels: int = 3) -> np.ndarray:
    """One image as uint8 [channels, size, size].

    The EXIF orientation is applied; 16-bit grayscale becomes 8-bit as round(v / 257) (PIL's own
    conversion clips it at 255; PIL reads 16-bit colour by its high bytes, within 1 of that); an image with transparency (alpha, or a palette or colour key
    with transparency) is composited on ``background``, so a transparent pixel takes exactly its
    colour. The result is converted to RGB (grayscale replicated) or to L (ITU-R 601 luma), its
    shorter side resized to ``size`` and center-cropped. The filter is PIL's BICUBIC: PIL widens
    its support by the downscale factor, so it anti-aliases when shrinking with no BOX pre-pass, is
    sharper than BOX or BILINEAR, rings less than LANCZOS, and is what most DDPM code (e.g.
    improved-diffusion) uses here.
    """
    from PIL import Image, ImageOps

    rgb = parse_background(background)
    try:
        with Image.open(path) as img:
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode in WIDE_MODES:
                wide = np.asarray(img).astype(np.int64).clip(0, 65535)
                img = Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L")
            if img.has_transparency_data:
                # straight to RGBA: a palette's transparency converted to RGB only warns and is dropped
                img = Image.alpha_composite(Image.new("RGBA", img.size, (*rgb, 255)), img.convert("RGBA"))
            img = img.convert("L" if channels == 1 else "RGB")  # also forces the full decode
            w, h = img.size
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt files
        raise DatasetError(f"cannot read image {path}: {_oneline(e)}") from e
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def all_grayscale(paths: list) -> bool:
    """Whether every image in ``paths`` is grayscale, by the modes in their headers (nothing is
    decoded; stops at the first colour image). A palette image counts as colour."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as img:
                if img.mode not in GRAY_MODES:
                    return False
        except Exception as e:
            raise DatasetError(f"cannot read image {path}: {_oneline(e)}") from e
    return True


# ---- a folder ------------------------------------------------------------------------------------


def image_folder(path: PathLike, size: int, *, background: str = "white", channels: int | None = None,
                 cache_dir: PathLike | None = None, workers: int | None = None) -> ImageDataset:
    """Every .png, .jpg or .jpeg (any case) under ``path``, recursive and in sorted order, as
    uint8 [N, C, size, size] with levels=256, each image as `decode_image` makes it.

    C is ``channels``, or when None 1 if every image is grayscale, else 3. When every image lies in
    a subfolder, the subfolders are the classes (torchvision's ImageFolder convention): labels by
    the sorted subfolder names. The images are decoded
    once into the folder's cache (`cache.cached_images`: a memory-mapped .npy under ``cache_dir``,
    $FASTDDPM_CACHE or ~/.cache/fastddpm/folders, decoded by ``workers`` processes, default one a
    core from 1,024 images) and the set's codes are that memory map: nothing is read whole.
    """
    root = Path(os.path.expanduser(os.fspath(path)))
    size = _check_size(size, root)
    parse_background(background)
    check_channels(channels)
    if not root.exists():
        raise DatasetError(f"dataset path does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root}")
    try:
        names = _list_images(root)
    except OSError as e:  # pragma: no cover
        raise DatasetError(f"cannot list {root}: {_oneline(e)}") from e
    if not names:
        raise DatasetError(f"no PNG/JPEG images under {root}")

    def plan(pool_map):  # run only to build the cache: the channels, then how to decode one image
        c = channels or (1 if all(pool_map(all_grayscale)) else 3)
        return partial(decode_image, size=size, background=background, channels=c), (c, size, size)

    codes, _ = cache.cached_images(root, names, {"size": size, "background": background, "channels": channels}, plan,
                                   cache_dir=cache_dir, workers=workers)
    labels, classes = _subfolder_classes(names)
    return ImageDataset(torch.from_numpy(codes), levels=256, name=f"folder:{root}", labels=labels, classes=classes)


def _subfolder_classes(names: list[str]):
    """(labels, class names) from the first folder of each relative path, or (None, None) when some
    image lies at the top."""
    tops = [name.split("/", 1)[0] if "/" in name else None for name in names]
    if None in tops:
        return None, None
    classes = sorted(set(tops))
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[t] for t in tops], dtype=np.int64), classes


def _check_size(size, where) -> int:
    if size is None:
        raise DatasetError(f"an image size is required to load the image folder {where}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DatasetError(f"invalid image size {size!r} for {where}: must be a positive integer")
    return int(size)
