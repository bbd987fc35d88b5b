"""Fused L_simple and its gradient: `fastddpm.reference.simple_loss` with the target regenerated.

The target (ε, x_0, or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0) is rebuilt in the kernel: ε is loaded,
or regenerated from the noise contract at (seed, sample_base + b, step, STREAM_TRAIN), the
coordinates `q_sample` drew it at, so it is never stored.

* `eps_loss` — one launch, grid (⌈Q/BLOCK_G⌉, B): per-block partial sums of (pred − target)²
  (already divided by N) into a [B, n_blocks] buffer, summed by torch in a fixed order
  (deterministic, no atomics; no op at all when a sample fits one program)
  and, in the same pass, the gradient of mean_b(w_b · mse_b) with respect to pred.
* `eps_loss_grad` — the gradient alone, 2 (pred − target) · c[b] for a given per-sample c:
  for a backward that regenerates the target instead of keeping the forward's gradient.
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
def _eps_loss_kernel(
    pred_ptr, x0_ptr, t_ptr, table_ptr, noise_ptr, key_ptr, c_ptr, grad_ptr, partial_ptr,
    seed: tl.int64, sample_base: tl.int64, step: tl.int64, grad_scale, loss_scale,
    N, Q, stride_p, T,
    PREDICTION: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_KEY: tl.constexpr, HAS_C: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    STREAM: tl.constexpr, BLOCK_G: tl.constexpr,
    ROW_SQRT_AC: tl.constexpr, ROW_SQRT_1M_AC: tl.constexpr,
):
    pid_g = tl.program_id(0)
    b = tl.program_id(1)
    g, e, mask = quarter_offsets(pid_g, N, Q, BLOCK_G)
    bb = b.to(tl.int64)
    off = bb * N + e
    p = tl.load(pred_ptr + bb * stride_p + e, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + off, mask=mask, other=0.0)
    if PREDICTION == 1:
        target = x0
    else:
        if HAS_NOISE:
            eps = tl.load(noise_ptr + off, mask=mask, other=0.0)
        else:
            seed, sample_base, step = load_key(key_ptr, seed, sample_base, step, HAS_KEY)
            eps = normal_quarters(seed, sample_base + b, step, STREAM, g)
        if PREDICTION == 0:
            target = eps
        else:
            t = tl.load(t_ptr + b)
            target = coef(table_ptr, T, t, ROW_SQRT_AC) * eps - coef(table_ptr, T, t, ROW_SQRT_1M_AC) * x0
    diff = tl.where(mask, p - target, 0.0)
    if WRITE_LOSS:
        partial = tl.sum(tl.sum(diff * diff, axis=1), axis=0) * loss_scale
        tl.store(partial_ptr + bb * tl.num_programs(0) + pid_g, partial)
    if WRITE_GRAD:
        if HAS_C:
            c = tl.load(c_ptr + b).to(tl.float32) * grad_scale
        else:
            c = grad_scale
        tl.store(grad_ptr + off, (2.0 * diff) * c, mask=mask)


def _prepare(pred, x0, t, table, noise, seed, sample_base, step, key, prediction):
    U.check_batch(x0, "x0")
    device = x0.device
    x0 = U.check_image(x0, "x0", device)
    B, N = x0.shape[0], U.per_sample_numel(x0)
    pred, stride_p = U.check_model(pred, "pred", device, B, N)
    pred_i = U.enum(prediction, U.PREDICTIONS, "prediction")
    t = U.check_t(t, B, device)
    table = U.check_table(table, device)
    if noise is not None:
        noise = U.check_noise(noise, B, N, device)
    *coords, key = U.coordinates(seed, sample_base, step, key, device)
    if noise is not None or pred_i == 1:
        key = None  # unused: the target needs no ε
    return pred, stride_p, x0, t, table, noise, key, tuple(coords), pred_i, B, N


def _launch(pred, stride_p, x0, t, table, noise, key, c, grad, partial, coords, grad_scale, N, pred_i, grid, blk):
    U.launcher(_eps_loss_kernel)[grid](
        pred, x0, t, table, noise if noise is not None else x0, key if key is not None else t,
        c if c is not None else x0,
        grad if grad is not None else x0, partial if partial is not None else x0,
        *coords, grad_scale, 1.0 / N, N, U.quarter(N), stride_p, table.shape[1],
        PREDICTION=pred_i, HAS_NOISE=noise is not None, HAS_KEY=key is not None, HAS_C=c is not None,
        WRITE_LOSS=partial is not None, WRITE_GRAD=grad is not None,
        STREAM=STREAM_TRAIN, BLOCK_G=blk,
        ROW_SQRT_AC=U.ROW["sqrt_alphas_cumprod"], ROW_SQRT_1M_AC=U.ROW["sqrt_one_minus_alphas_cumprod"],
        num_warps=U.num_warps(blk),
    )


def eps_loss(pred, x0, t, table, weights=None, noise=None, seed: int = 0, sample_base: int = 0, step: int = 0, *,
             prediction: str, compute_grad: bool = True, grad_scale: float | None = None,
             key: torch.Tensor | None = None, block_g: int | None = None):
    """(per_sample [B] float32, grad float32 in pred's shape, or None without ``compute_grad``).

    per_sample is `reference.simple_loss`'s per-sample MSE; grad is 2 (pred − target) · w_b ·
    ``grad_scale``: with the default 1/(B·N) the gradient of mean_b(w_b · per_sample_b) (the
    loss `simple_loss` returns) with respect to ``pred``; with 1/N (and no weights) that of each
    per_sample_b, as the `fastddpm::eps_loss` operator returns.
    pred: float32/float16/bfloat16 [B, ...] with N elements per sample, each sample dense,
    any batch stride (e.g. ``model_out[:, :C]`` of a learned-range output). x0: float32
    [B, ...] (copied if not contiguous). weights: [B] or None (all 1). noise: float32 [B, ...]
    or None for the contract's ε at (seed, sample_base + b, step, STREAM_TRAIN). ``key``: int64
    [seed, sample_base, step] on the device, read by the kernel instead of the scalars.
    """
    pred, stride_p, x0, t, table, noise, key, coords, pred_i, B, N = _prepare(
        pred, x0, t, table, noise, seed, sample_base, step, key, prediction)
    if weights is not None:
        weights = U.check_per_sample(weights, "weights", B, x0.device)
    Q = U.quarter(N)
    blk = U.block_g(Q, block_g)
    grid = (triton.cdiv(Q, blk), B)
    partial = torch.empty(B, grid[0], device=x0.device, dtype=torch.float32)
    grad = torch.empty(pred.shape, device=x0.device, dtype=torch.float32) if compute_grad else None
    scale = 1.0 / (B * N) if grad_scale is None else float(grad_scale)
    _launch(pred, stride_p, x0, t, table, noise, key, weights, grad, partial, coords, scale, N, pred_i, grid, blk)
    return U.sum_partials(partial), grad


def eps_loss_grad(pred, x0, t, table, c, noise=None, seed: int = 0, sample_base: int = 0, step: int = 0, *,
                  prediction: str, key: torch.Tensor | None = None, block_g: int | None = None) -> torch.Tensor:
    """grad = 2 (pred − target) · c[b] (float32, pred's shape), the target regenerated as in `eps_loss`.

    With c = w / (B·N) this is `eps_loss`'s gradient; scale c by the incoming gradient for a
    backward pass. c: floating [B]."""
    pred, stride_p, x0, t, table, noise, key, coords, pred_i, B, N = _prepare(
        pred, x0, t, table, noise, seed, sample_base, step, key, prediction)
    c = U.check_per_sample(c, "c", B, x0.device)
    Q = U.quarter(N)
    blk = U.block_g(Q, block_g)
    grad = torch.empty(pred.shape, device=x0.device, dtype=torch.float32)
    _launch(pred, stride_p, x0, t, table, noise, key, c, grad, None, coords, 1.0, N, pred_i, (triton.cdiv(Q, blk), B),
            blk)
    return grad
