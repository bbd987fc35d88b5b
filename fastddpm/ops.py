"""The fused operators, and the two implementations GaussianDiffusion can run them on.

Each operator is defined, whole, in its own module of `fastddpm.kernels` (see kernels/README.md):

    q_sample(x0, t, table, noise, key) -> x_t
    reverse_step(x_t, model_out, t, table, noise, key, prediction, variance, clip_denoised, eta) -> x_{t−1}
    simple_loss(pred, x0, t, table, noise, key, prediction) -> (per-sample MSE [B], d MSE_b / d pred)
    vlb_terms(model_out, x0, x_t, t, table, prediction, variance, clip_denoised, levels) -> bits/dim [B]
    solver_step(x, model_out, step, t, table, history, noise, key, prediction, variance, clip_denoised,
                stochastic) -> () (x and history written in place)

`FUSED` calls them as ``torch.ops.fastddpm.*`` (the native kernel on the CPU, Triton on CUDA,
the eager reference for float64 data and elsewhere); `REFERENCE` runs the eager reference
directly, with the same signatures and checks (the ground truth of the parity tests, and the
"eager" rows of the benchmarks).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .kernels import q_sample, reverse_step, simple_loss, solver_step, vlb_terms


class Backend(NamedTuple):
    name: str
    q_sample: Callable
    reverse_step: Callable
    simple_loss: Callable
    vlb_terms: Callable
    solver_step: Callable


_OPS = (q_sample, reverse_step, simple_loss, vlb_terms, solver_step)
FUSED = Backend("fused", *(module.op.default for module in _OPS))
REFERENCE = Backend("reference", *(module.op.reference for module in _OPS))
BACKENDS = ("auto", "fused", "reference")


def backend_for(name: str, dtype: torch.dtype = torch.float32) -> Backend:
    """The ops of backend ``name``: "auto" runs float32 on the fused operators and float64 on the
    reference (the kernels compute in float32, so the operators would only forward it there)."""
    if name == "auto":
        return REFERENCE if dtype == torch.float64 else FUSED
    if name == "fused":
        return FUSED
    if name == "reference":
        return REFERENCE
    raise ValueError(f"unknown backend {name!r}; expected one of: {', '.join(BACKENDS)}")
