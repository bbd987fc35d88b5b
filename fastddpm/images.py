"""Writing samples as pictures: a PNG grid of a batch in [−1, 1]."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from .datasets import quantize


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(x, nrow=nrow, scale=scale).save(path)
    return path
