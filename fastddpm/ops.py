"""The seam where fused ops plug in.

`GaussianDiffusion` runs q_sample, reverse_step, simple_loss and vlb_terms through the
backend chosen here, by name or automatically by device; each backend implements those
ops with the signatures of `fastddpm.reference`, which is the ground truth for all of them.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import reference

BACKENDS: dict[str, ModuleType] = {"reference": reference}


def backend_for(name: str, device: torch.device | str) -> ModuleType:
    """The ops module for backend ``name`` ("auto" picks the fastest one for ``device``)."""
    if name == "auto":
        return reference
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    return BACKENDS[name]
