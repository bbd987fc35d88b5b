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


# ---- class labels and classifier-free guidance --------------------------------------------------

BALANCED = "balanced"
# Classifier-free guidance's w where none is asked for (`fastddpm sample --class/--classes`, the
# trainer's grids and scores). On the conditional digits job (dpmpp_2m, 10 steps, 3 × 1500 images;
# `python -m benchmarks --only guidance`) the worst class's accuracy and the distance in sets of 297
# (floor 6.40) were: w = 1: 0.927, 2.94; w = 1.5: 0.987, 4.89; w = 2: 1.0, 7.96; w = 4: 1.0, 13.4.
DEFAULT_GUIDANCE = 1.5


def check_classes(classes, num_classes: int):
    """``classes`` as the sampler takes them: None, a class index (every image), "balanced" (image k
    is class k mod K) or one label per image (a 1-D sequence or integer tensor, returned as int64),
    each in [0, K)."""
    if classes is None or (isinstance(classes, str) and classes == BALANCED):
        return classes
    labels = None
    if isinstance(classes, int) and not isinstance(classes, bool):
        labels = torch.tensor([classes])
    elif not isinstance(classes, (str, bool)):
        try:
            labels = torch.as_tensor(classes)
        except (TypeError, ValueError, RuntimeError):
            pass
    if labels is None or labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise ValueError(f"classes must be a class index, {BALANCED!r} or one integer label per image, got "
                         f"{_what(classes)}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes - 1}] (the model's {num_classes} classes), got "
                         f"{int(labels.min())} to {int(labels.max())}")
    return classes if isinstance(classes, int) else labels.long()


def class_labels(classes, num_classes: int, start: int, n: int) -> torch.Tensor:
    """int64 [n]: the classes (`check_classes`) of images ``start`` … ``start`` + n − 1; a function of
    the image index for an index or "balanced", so every shard and batch agrees; per-image labels
    are the n images' own."""
    if isinstance(classes, str):  # balanced
        return (start + torch.arange(n)) % num_classes
    if isinstance(classes, int):
        return torch.full((n,), classes, dtype=torch.int64)
    if len(classes) != n:
        raise ValueError(f"classes holds {len(classes)} labels for {n} images")
    return classes.cpu()


def guided(model_kwargs: dict, null_class: int) -> dict:
    """The conditioning of a guided batch [2B]: the batch's own (labels ``y``), then the same with
    every label the null class — classifier-free guidance's conditional and unconditional branches."""
    out = {}
    for name, value in model_kwargs.items():
        if not isinstance(value, torch.Tensor):
            out[name] = value
        elif name == "y":
            out[name] = torch.cat([value, torch.full_like(value, null_class)])
        else:
            out[name] = torch.cat([value, value])
    return out


def _what(value) -> str:
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
