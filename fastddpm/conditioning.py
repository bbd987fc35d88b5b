"""Conditioning passed through to the model: ``model_kwargs``, as improved-diffusion passes them.

Every model call is ``model(x_t, t, **model_kwargs)``. A tensor value holds one entry per image,
batch dimension first (class labels [B], embeddings [B, ...]): it is checked against the batch,
and sliced and moved with it; any other value (a flag such as ``return_dict=False``) is handed
to the model as it is. Since every entry belongs to one image, image k of a seed with the same
conditioning is the same in any batch.
"""

from __future__ import annotations

import torch


def check(model_kwargs, batch: int, device: torch.device | None = None) -> dict:
    """``model_kwargs`` (None: no conditioning) if each tensor in it has ``batch`` entries (and lives
    on ``device``, when given), else a ValueError naming the key."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise ValueError(f"model_kwargs must be a dict of argument name -> value, got {type(model_kwargs).__name__}")
    for name, value in model_kwargs.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.ndim == 0 or value.shape[0] != batch:
            raise ValueError(f"model_kwargs[{name!r}] has shape {tuple(value.shape)}: its first dimension must be "
                             f"the batch, {batch}")
        if device is not None and value.device != torch.device(device):
            raise ValueError(f"model_kwargs[{name!r}] is on {value.device}, the images on {device}")
    return model_kwargs


def select(model_kwargs: dict, start: int, stop: int, device: torch.device) -> dict:
    """The conditioning of images ``start`` … ``stop`` − 1, on ``device``."""
    return {name: value[start:stop].to(device) if isinstance(value, torch.Tensor) else value
            for name, value in model_kwargs.items()}
