"""Fused forward process x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε: `fastddpm.reference.q_sample`.

One launch, grid (⌈Q/BLOCK_G⌉, B). ε is loaded, or regenerated from the noise contract at
(seed, sample_base + b, step, STREAM_TRAIN), the same coordinates `eps_loss` uses, so the
training noise is never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm.rng import STREAM_TRAIN

from . import _utils as U
from ._common import coef
from .noise import load_key, normal_quarters, quarter_offsets


@triton.jit(do_not_specialize=["seed", "sample_base", "step"])
def _q_sample_kernel(
    x0_ptr, t_ptr, table_ptr, noise_ptr, key_ptr, out_ptr,
    seed: tl.int64, sample_base: tl.int64, step: tl.int64,
    N, Q, T,
    HAS_NOISE: tl.constexpr, HAS_KEY: tl.constexpr, STREAM: tl.constexpr, BLOCK_G: tl.constexpr,
    ROW_SQRT_AC: tl.constexpr, ROW_SQRT_1M_AC: tl.constexpr,
):
    b = tl.program_id(1)
    t = tl.load(t_ptr + b)
    sa = coef(table_ptr, T, t, ROW_SQRT_AC)
    s1ma = coef(table_ptr, T, t, ROW_SQRT_1M_AC)
    g, e, mask = quarter_offsets(tl.program_id(0), N, Q, BLOCK_G)
    off = b.to(tl.int64) * N + e
    x0 = tl.load(x0_ptr + off, mask=mask, other=0.0)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + off, mask=mask, other=0.0)
    else:
        seed, sample_base, step = load_key(key_ptr, seed, sample_base, step, HAS_KEY)
        eps = normal_quarters(seed, sample_base + b, step, STREAM, g)
    tl.store(out_ptr + off, sa * x0 + s1ma * eps, mask=mask)


def q_sample(x0, t, table, noise=None, seed: int = 0, sample_base: int = 0, step: int = 0, *,
             key: torch.Tensor | None = None, block_g: int | None = None) -> torch.Tensor:
    """x_t (float32, x0's shape), exactly `reference.q_sample`.

    x0: float32 [B, ...] (copied if not contiguous). t: int64 [B] in [0, T). table:
    `Coefficients.table` float32 [R, T]. noise: float32 [B, ...] with N elements per sample,
    or None for the contract's ε at (seed, sample_base + b, step, STREAM_TRAIN). ``key``: int64
    [seed, sample_base, step] on the device, read by the kernel instead of the scalars.
    """
    U.check_batch(x0, "x0")
    device = x0.device
    x0 = U.check_image(x0, "x0", device)
    B, N = x0.shape[0], U.per_sample_numel(x0)
    t = U.check_t(t, B, device)
    table = U.check_table(table, device)
    if noise is not None:
        noise = U.check_noise(noise, B, N, device)
    seed_i, base, step_i, key = U.coordinates(seed, sample_base, step, key, device)
    if noise is not None:
        key = None  # unused
    out = torch.empty_like(x0)
    Q = U.quarter(N)
    blk = U.block_g(Q, block_g)
    U.launcher(_q_sample_kernel)[(triton.cdiv(Q, blk), B)](
        x0, t, table, noise if noise is not None else x0, key if key is not None else t, out,
        seed_i, base, step_i, N, Q, table.shape[1],
        HAS_NOISE=noise is not None, HAS_KEY=key is not None, STREAM=STREAM_TRAIN, BLOCK_G=blk,
        ROW_SQRT_AC=U.ROW["sqrt_alphas_cumprod"], ROW_SQRT_1M_AC=U.ROW["sqrt_one_minus_alphas_cumprod"],
        num_warps=U.num_warps(blk),
    )
    return out
