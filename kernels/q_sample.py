"""q_sample: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a draw from q(x_t | x_0) — eq. (4), fused.

    torch.ops.fastddpm.q_sample(x0, t, table, noise, key) -> x_t

x0: float32 (or float64) [B, ...]. t: int64 [B], indices into the schedule. table: the
schedule's `Coefficients.table` in x0's dtype. noise: ε like x0, or None to draw the noise
contract's ε at (seed, sample_base + b, step, STREAM_TRAIN) from key = int64 [seed,
sample_base, step] (`fastddpm.rng.noise_key`): the coordinates `simple_loss` regenerates it
at, so the training noise is never stored. Differentiable in x0 and noise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastddpm import reference, rng
from fastddpm.schedule import Coefficients

from . import checks, library
from . import triton_common as tc
from .triton_common import HAS_TRITON, tl, triton

NAME = "q_sample"


def check(x0, t, table, noise, key) -> torch.dtype:
    """The images' dtype, once every argument is checked."""
    dtype = checks.images(NAME, x0=x0, noise=noise).dtype
    checks.timesteps_and_table(NAME, t, table, x0)
    checks.key(NAME, key, noise, x0)
    return dtype


def reference_q_sample(x0: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor], key: Optional[Tensor]) -> Tensor:
    if noise is None:
        noise = rng.normal_at_key(key, x0, rng.STREAM_TRAIN)
    return reference.q_sample(x0, t, noise, Coefficients.from_table(table))


# ---- native (CPU) -------------------------------------------------------------------------


def native_q_sample(x0, t, table, noise, key):
    x0, t, table = x0.contiguous(), t.contiguous(), table.contiguous()
    out = torch.empty_like(x0)
    noise = None if noise is None else noise.contiguous()
    seed, sample_base, step = rng.unpack_key(key) if noise is None else (0, 0, 0)
    library.native.q_sample(out.data_ptr(), x0.data_ptr(), t.data_ptr(), table.data_ptr(), table.shape[1],
                            x0.shape[0], library.per_sample_numel(x0), 0 if noise is None else noise.data_ptr(),
                            seed, sample_base, step)
    return out


# ---- Triton (CUDA) ------------------------------------------------------------------------


@triton.jit
def _q_sample_kernel(x0_ptr, t_ptr, table_ptr, noise_ptr, key_ptr, out_ptr, N, Q, T, blocks,
                     HAS_NOISE: tl.constexpr, BLOCK_G: tl.constexpr):
    b, g = tc.sample_and_groups(blocks, BLOCK_G)
    t, ok = tc.timestep(t_ptr, b, T)
    sa = tc.coef(table_ptr, T, t, ok, tc.ROW_SQRT_ALPHAS_CUMPROD)
    s1ma = tc.coef(table_ptr, T, t, ok, tc.ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD)
    row = b.to(tl.int64) * N
    drawn = tc.draw_normals(key_ptr, b, t, g, tc.TRAIN, not HAS_NOISE)
    for j in tl.static_range(4):
        e, mask, eps = tc.quarter_and_noise(j, g, N, Q, noise_ptr + row, drawn, HAS_NOISE)
        x0 = tl.load(x0_ptr + row + e, mask=mask, other=0.0)
        tl.store(out_ptr + row + e, sa * x0 + s1ma * eps, mask=mask)


def triton_q_sample(x0, t, table, noise, key):
    x0, t, table = x0.contiguous(), t.contiguous(), table.contiguous()
    noise = None if noise is None else noise.contiguous()
    out, L = torch.empty_like(x0), tc.launch_plan(x0)
    tc.launch(_q_sample_kernel, L.grid, x0.device, x0, t, table, x0 if noise is None else noise,
              t if key is None else key, out, L.N, L.Q, table.shape[1], L.blocks,
              HAS_NOISE=noise is not None, BLOCK_G=L.block, num_warps=L.warps)
    return out


# ---- the operator ---------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x0, t, table, noise, _ = inputs
    ctx.save_for_backward(t, table)
    ctx.noise_given = noise is not None


def _backward(ctx, grad):
    """d x_t / d x0 = √ᾱ_t, d x_t / d ε = √(1 − ᾱ_t)."""
    t, table = ctx.saved_tensors
    coef = Coefficients.from_table(table)
    grad_x0 = reference.at(coef.sqrt_alphas_cumprod, t, grad).to(grad.dtype) * grad
    grad_noise = reference.at(coef.sqrt_one_minus_alphas_cumprod, t, grad).to(grad.dtype) * grad if ctx.noise_given else None
    return grad_x0, None, None, grad_noise, None


op = library.define(NAME, reference_q_sample, check, library.like, cpu=native_q_sample,
                    cuda=triton_q_sample if HAS_TRITON else None, backward=_backward, setup_context=_setup_context)
