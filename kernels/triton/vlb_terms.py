"""Fused per-sample terms of the variational bound in bits/dim: `fastddpm.reference.vlb_terms`.

L_{t−1} = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) for t > 0 and the decoder
L_0 = −log p_θ(x_0|x_1) (discretized Gaussian over ``levels`` values) at t = 0, averaged over
the elements and divided by ln 2. One launch, grid (⌈Q/BLOCK_G⌉, B), writing per-block
partial sums (already scaled by 1/(N ln 2)) to a [B, n_blocks] buffer that torch sums in a
fixed order (no atomics; no op at all when a sample fits one program).

The middle bins take Φ(upper) − Φ(lower) on the side away from the tail, clamped at 1e-12,
with Φ(x) = (1 + erf(x/√2))/2 (`tl.math.erf`, as `torch.special.ndtr`) for x >= −1 and
erfc(−x/√2)/2 below. torch's ndtr is the erf form everywhere, so its tail values are only
accurate to ~6e-8 absolute; there the kernel agrees with the float64 reference rather than
the float32 one. The edge bins use log Φ as `torch.special.log_ndtr`. erfc/erfcx come from
a Chebyshev fit (Numerical Recipes `erfcc`, fractional error < 1.2e-7): libdevice's
erfc/erfcx are extern calls, which the interpreter cannot run.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _utils as U
from ._common import coef, learned_log_variance, predict_x0
from .noise import quarter_offsets


@triton.jit
def _log_erfcx(z):
    """log erfcx(z) = log(erfc(z) e^{z²}) for z >= 0: log τ + P(τ), τ = 1/(1 + z/2), from the
    Chebyshev fit erfc(z) = τ exp(−z² + P(τ)) (Numerical Recipes `erfcc`, fractional error < 1.2e-7)."""
    tau = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + tau * (1.00002368 + tau * (0.37409196 + tau * (0.09678418 + tau * (
        -0.18628806 + tau * (0.27886807 + tau * (-1.13520398 + tau * (1.48851587 + tau * (
            -0.82215223 + tau * 0.17087277))))))))
    return tl.log(tau) + poly


@triton.jit
def ndtr(x):
    """Φ(x): (1 + erf(x/√2))/2 as `torch.special.ndtr` for x >= −1; erfc(−x/√2)/2 below, which keeps
    its relative accuracy in the lower tail (the erf form is only accurate to ~6e-8 absolute there)."""
    t = x * 0.7071067811865476
    z = tl.maximum(-t, 0.5)
    tail = 0.5 * tl.exp(_log_erfcx(z) - z * z)
    bulk = (1.0 + tl.math.erf(t)) * 0.5
    return tl.where(x < -1.0, tail, bulk)


@triton.jit
def log_ndtr(x):
    """log Φ(x), accurate in both tails, as `torch.special.log_ndtr`: log(erfcx(−x/√2)/2) − x²/2
    below −1, log1p(−erfc(x/√2)/2) above."""
    t = x * 0.7071067811865476
    z = tl.maximum(-t, 0.5)
    lower_tail = (_log_erfcx(z) - 0.6931471805599453) - z * z
    a = tl.abs(tl.maximum(t, -0.75))
    erfc_a = tl.exp(_log_erfcx(a) - a * a)
    y = -0.5 * tl.where(t >= 0, erfc_a, 2.0 - erfc_a)  # −erfc(t)/2
    u = 1.0 + y
    log1p_y = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(x < -1.0, lower_tail, log1p_y)


@triton.jit
def _decoder_ll(x, mean, log_scale, half_bin, lo_edge, hi_edge):
    """`gaussian.discretized_gaussian_log_likelihood` elementwise (nats)."""
    inv_std = tl.exp(-log_scale)
    upper = inv_std * ((x - mean) + half_bin)
    lower = inv_std * ((x - mean) - half_bin)
    # middle bins: Φ(upper) − Φ(lower), or Φ(−lower) − Φ(−upper) when lower > 0 (away from the tail)
    away = lower > 0
    mid = ndtr(tl.where(away, -lower, upper)) - ndtr(tl.where(away, -upper, lower))
    log_mid = tl.log(tl.maximum(mid, 1e-12))
    # edge bins: log Φ(upper) for the lowest value, log(1 − Φ(lower)) = log Φ(−lower) for the highest
    lowest = x < lo_edge
    edge = lowest | (x > hi_edge)
    return tl.where(edge, log_ndtr(tl.where(lowest, upper, -lower)), log_mid)


@triton.jit
def _vlb_kernel(
    mo_ptr, x0_ptr, xt_ptr, t_ptr, table_ptr, partial_ptr,
    half_bin, lo_edge, hi_edge, scale,
    N, Q, stride_mo, T,
    PREDICTION: tl.constexpr, VARIANCE: tl.constexpr, CLIP: tl.constexpr, BLOCK_G: tl.constexpr,
    ROW_SQRT_RECIP_AC: tl.constexpr, ROW_SQRT_RECIPM1_AC: tl.constexpr, ROW_SQRT_AC: tl.constexpr,
    ROW_SQRT_1M_AC: tl.constexpr, ROW_PM_COEF1: tl.constexpr, ROW_PM_COEF2: tl.constexpr,
    ROW_LOG_BETAS: tl.constexpr, ROW_POST_LOGVAR: tl.constexpr, ROW_LOG_LARGE_VAR: tl.constexpr,
):
    pid_g = tl.program_id(0)
    b = tl.program_id(1)
    t = tl.load(t_ptr + b)
    c1 = coef(table_ptr, T, t, ROW_PM_COEF1)
    c2 = coef(table_ptr, T, t, ROW_PM_COEF2)
    plvc = coef(table_ptr, T, t, ROW_POST_LOGVAR)  # log β̃_t: the true posterior's log-variance

    _, e, mask = quarter_offsets(pid_g, N, Q, BLOCK_G)
    bb = b.to(tl.int64)
    x0 = tl.load(x0_ptr + bb * N + e, mask=mask, other=0.0)
    xt = tl.load(xt_ptr + bb * N + e, mask=mask, other=0.0)
    p = tl.load(mo_ptr + bb * stride_mo + e, mask=mask, other=0.0).to(tl.float32)
    px0 = predict_x0(xt, p, coef(table_ptr, T, t, ROW_SQRT_RECIP_AC), coef(table_ptr, T, t, ROW_SQRT_RECIPM1_AC),
                     coef(table_ptr, T, t, ROW_SQRT_AC), coef(table_ptr, T, t, ROW_SQRT_1M_AC), PREDICTION, CLIP)
    mean = c1 * px0 + c2 * xt
    if VARIANCE == 2:
        v = tl.load(mo_ptr + bb * stride_mo + N + e, mask=mask, other=0.0).to(tl.float32)
        lv = learned_log_variance(v, coef(table_ptr, T, t, ROW_LOG_BETAS), plvc)
    elif VARIANCE == 1:
        lv = coef(table_ptr, T, t, ROW_LOG_LARGE_VAR)
    else:
        lv = plvc
    if t == 0:
        term = -_decoder_ll(x0, mean, 0.5 * lv, half_bin, lo_edge, hi_edge)
    else:
        true_mean = c1 * x0 + c2 * xt
        d = true_mean - mean
        term = 0.5 * ((((-1.0 + lv) - plvc) + tl.exp(plvc - lv)) + (d * d) * tl.exp(-lv))
    term = tl.where(mask, term, 0.0)
    tl.store(partial_ptr + bb * tl.num_programs(0) + pid_g, tl.sum(tl.sum(term, axis=1), axis=0) * scale)


def vlb_terms(model_out, x0, x_t, t, table, *, prediction: str, variance: str, clip_denoised: bool,
              levels: int, block_g: int | None = None) -> torch.Tensor:
    """[B] float32 bits/dim, exactly `reference.vlb_terms`: the KL term L_{t−1} where t > 0,
    the decoder NLL L_0 where t == 0.

    model_out: float32/float16/bfloat16 [B, ...] with N (2N for learned_range) elements per
    sample, each sample dense, any batch stride. x0, x_t: float32 [B, ...] (copied if not
    contiguous). t: int64 [B] in [0, T). table: `Coefficients.table`. levels: the data's
    number of values in [−1, 1] (256 for 8-bit images).
    """
    U.check_batch(x0, "x0")
    device = x0.device
    x0 = U.check_image(x0, "x0", device)
    B, N = x0.shape[0], U.per_sample_numel(x0)
    x_t = U.check_image(x_t, "x_t", device)
    if x_t.shape[0] != B or U.per_sample_numel(x_t) != N:
        raise ValueError(f"x_t must match x0's [B, N] = [{B}, {N}], got shape {tuple(x_t.shape)}")
    pred_i = U.enum(prediction, U.PREDICTIONS, "prediction")
    var_i = U.enum(variance, U.VARIANCES, "variance")
    if not isinstance(clip_denoised, bool):
        raise ValueError(f"clip_denoised must be a bool, got {clip_denoised!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    model_out, stride_mo = U.check_model(model_out, "model_out", device, B, N, (2,) if var_i == 2 else (1,))
    t = U.check_t(t, B, device)
    table = U.check_table(table, device)

    half_bin = 1.0 / (levels - 1)  # the thresholds as reference computes them: in double, then float32
    Q = U.quarter(N)
    blk = U.block_g(Q, block_g)
    grid = (triton.cdiv(Q, blk), B)
    partial = torch.empty(B, grid[0], device=device, dtype=torch.float32)
    R = U.ROW
    U.launcher(_vlb_kernel)[grid](
        model_out, x0, x_t, t, table, partial,
        half_bin, -1 + half_bin, 1 - half_bin, 1.0 / (N * math.log(2.0)),
        N, Q, stride_mo, table.shape[1],
        PREDICTION=pred_i, VARIANCE=var_i, CLIP=clip_denoised, BLOCK_G=blk,
        ROW_SQRT_RECIP_AC=R["sqrt_recip_alphas_cumprod"], ROW_SQRT_RECIPM1_AC=R["sqrt_recipm1_alphas_cumprod"],
        ROW_SQRT_AC=R["sqrt_alphas_cumprod"], ROW_SQRT_1M_AC=R["sqrt_one_minus_alphas_cumprod"],
        ROW_PM_COEF1=R["posterior_mean_coef1"], ROW_PM_COEF2=R["posterior_mean_coef2"],
        ROW_LOG_BETAS=R["log_betas"], ROW_POST_LOGVAR=R["posterior_log_variance_clipped"],
        ROW_LOG_LARGE_VAR=R["log_large_variance"],
        num_warps=U.num_warps(blk),
    )
    return U.sum_partials(partial)
