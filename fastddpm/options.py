"""The names of the choices every layer takes, and the codes the kernels read: defined once.

A kernel reads a choice as the index of its name here: prediction "eps" is 0, "x0" 1, "v" 2.
Triton reads the codes as module-level constexprs (`fastddpm.kernels.triton_common`), the C++
kernels mirror them (kernels/native/schedule.h, dtype.h) and `fastddpm.kernels.library` checks
the mirror when it loads the extension.
"""

from __future__ import annotations

from typing import Sequence

import torch

# What the network outputs: ε (the paper's), x_0, or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0.
PREDICTIONS = ("eps", "x0", "v")
# Σ_θ: β̃_t, β_t, or Nichol & Dhariwal's interpolation between their logs (2×C output channels).
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
# L_simple, the bound T·L_t, or L_simple + λ·T·L_t.
LOSSES = ("simple", "vlb", "hybrid")
# The U-Net's autocast dtype (None: plain float32); the diffusion chain itself stays float32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Model outputs the kernels read (all their arithmetic is float32).
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def choice(kind: str, value, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError naming the choice and what exists."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of: {', '.join(allowed)}")
    return value


def code(value, names: Sequence) -> int:
    """The kernels' integer code of ``value``: its index in ``names``."""
    return names.index(value)
