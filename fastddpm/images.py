"""Writing samples: a PNG grid, a uint8 .npz, or a directory of PNGs named by image index.

A directory belongs to one run: its manifest (``samples.json``) records the run that writes
there (the model's digest, the chain, the seed, ...), and since image k of a run is the same in
any batch and shard, shards of one run (``fastddpm sample --start k``) fill one directory, each
file named by its global index. A directory of another run, or holding files no run wrote, is
refused before any sampling (`prepare_output`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path
from .datasets import quantize

SUFFIXES = (".png", ".npz", "")
MANIFEST = "samples.json"


def image_grid(x: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int | None = None) -> Image.Image:
    """Tile images [N, C, H, W] in [−1, 1] into one 8-bit picture, ``nrow`` per row (default √N),
    each enlarged ``scale`` times with nearest-neighbour (default: 32 // size, so that tiny images
    such as 8×8 digits are readable)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1 or 3, H, W], got {tuple(x.shape)}")
    n, c, h, w = x.shape
    scale = max(1, 32 // max(h, w)) if scale is None else scale
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pixels = quantize(x.detach().cpu().float(), 256)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = pixels[i]
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if c == 1 else array, mode="L" if c == 1 else "RGB")
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def save_grid(x: torch.Tensor, path, nrow: int | None = None, scale: int | None = None) -> Path:
    with atomic_path(path) as tmp:
        image_grid(x, nrow=nrow, scale=scale).save(tmp)
    return Path(path)


def check_suffix(path) -> Path:
    """``path`` if its suffix names a way to write images (`save_images`), else a ValueError."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"cannot save images to {path}: expected a .png (one grid), a .npz (uint8 NHWC) "
                         "or a path without a suffix (a directory of PNGs)")
    return path


def prepare_output(path, run: dict | None = None) -> Path:
    """Check that samples can be written to ``path`` (by its suffix, see `save_images`) before any
    are drawn: the suffix, a writable folder, and for a directory that no other writer's files are
    in it, and then, given ``run`` (a JSON-serialisable description of what makes the images), its
    manifest: written for ``run``, or checked against it."""
    path = check_suffix(path)
    folder = path if path.suffix == "" else path.parent
    if path.suffix and path.is_dir():
        raise ValueError(f"cannot save images to {path}: it is a directory")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save images to {folder}: it is a file, not a directory")
    try:  # a read-only folder fails here, not after sampling
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ValueError(f"cannot write to {folder}: {err.strerror or err}") from None
    if path.suffix == "":
        _claim_directory(path, run)
    return path


def save_images(images: torch.Tensor, path, first: int = 0, scale: int = 1, run: dict | None = None,
                nrow: int | None = None) -> Path:
    """Write images [N, C, H, W] in [−1, 1] by ``path``'s suffix: ``.png`` one grid of ``nrow`` a row
    (default √N), each image enlarged ``scale`` times; ``.npz`` a uint8 [N, H, W, C] array ``arr_0`` (what FID tools read);
    no suffix a directory of PNGs at 1:1 as in the .npz, named by global image index (``first`` …
    ``first`` + N − 1, six digits or more), owned by ``run`` (`prepare_output`). Each file is
    written under a temporary name and renamed into place."""
    path = prepare_output(path, {} if run is None else run)
    if path.suffix.lower() == ".png":
        save_grid(images, path, nrow=nrow, scale=scale)
    elif path.suffix.lower() == ".npz":
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, arr_0=quantize(images, 256).permute(0, 2, 3, 1).numpy())
    else:
        for i, image in enumerate(images, start=first):
            with atomic_path(path / f"{i:06d}.png") as tmp:
                image_grid(image[None], padding=0, scale=1).save(tmp)
    return path


def _claim_directory(folder: Path, run: dict | None) -> None:
    """Make ``folder`` ``run``'s: write its manifest, or check the one there names the same run
    (without ``run``, only that the folder is empty or has a manifest)."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if others:
            raise ValueError(f"{folder} holds files that fastddpm sample did not write ({others[0]}, ...): "
                             "choose a new or empty directory")
    if run is None:
        return
    if not manifest.exists():
        tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"run": run}, indent=2, sort_keys=True) + "\n")
        try:  # a link is exclusive: of two shards starting at once, one writes it and the other checks it
            os.link(tmp, manifest)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        recorded = json.loads(manifest.read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"{manifest} is not a fastddpm samples manifest: choose a new or empty directory")
    run = json.loads(json.dumps(run))  # as JSON reads it back: tuples are lists
    if recorded != run:
        differ = sorted(k for k in {*run, *recorded} if recorded.get(k) != run.get(k))
        raise ValueError(f"{folder} holds images of another run (differs in {', '.join(differ) or 'run'}); "
                         "choose another directory")
