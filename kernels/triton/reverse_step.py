"""Fused reverse step x_{t−1} = f(x_t, model output, t, z): `fastddpm.reference.reverse_step`.

One launch, grid (⌈Q/BLOCK_G⌉, B), Q = ⌈N/4⌉: a program reads t[b] and its table scalars
once, draws (or loads) z for BLOCK_G group indices g and handles the [4, BLOCK_G] block of
elements j·Q + g: four contiguous runs, the quarters of the noise contract. Ancestral DDPM
(Algorithm 2) when ``eta`` is None, DDIM(η) otherwise; x̂_0 from ε/x_0/v, optional
clipping, fixed_small / fixed_large / learned_range variance; no noise where t[b] == 0.
All arithmetic in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm.rng import STREAM_REVERSE

from . import _utils as U
from ._common import coef, learned_log_variance, predict_x0
from .noise import load_key, normal_quarters, quarter_offsets


@triton.jit(do_not_specialize=["seed", "sample_base"])
def _reverse_step_kernel(
    x_ptr, mo_ptr, t_ptr, table_ptr, noise_ptr, key_ptr, out_ptr,
    seed: tl.int64, sample_base: tl.int64, eta,
    N, Q, stride_mo, T,
    PREDICTION: tl.constexpr, VARIANCE: tl.constexpr, CLIP: tl.constexpr, DDIM: tl.constexpr,
    HAS_NOISE: tl.constexpr, HAS_KEY: tl.constexpr, STREAM: tl.constexpr, BLOCK_G: tl.constexpr,
    ROW_SQRT_RECIP_AC: tl.constexpr, ROW_SQRT_RECIPM1_AC: tl.constexpr, ROW_SQRT_AC: tl.constexpr,
    ROW_SQRT_1M_AC: tl.constexpr, ROW_PM_COEF1: tl.constexpr, ROW_PM_COEF2: tl.constexpr,
    ROW_LOG_BETAS: tl.constexpr, ROW_POST_LOGVAR: tl.constexpr, ROW_LOG_LARGE_VAR: tl.constexpr,
    ROW_AC: tl.constexpr, ROW_AC_PREV: tl.constexpr,
):
    b = tl.program_id(1)
    t = tl.load(t_ptr + b)
    sra = coef(table_ptr, T, t, ROW_SQRT_RECIP_AC)
    srm1 = coef(table_ptr, T, t, ROW_SQRT_RECIPM1_AC)
    sa = coef(table_ptr, T, t, ROW_SQRT_AC)
    s1ma = coef(table_ptr, T, t, ROW_SQRT_1M_AC)
    nz = (t > 0).to(tl.float32)  # no noise at t = 0

    g, e, mask = quarter_offsets(tl.program_id(0), N, Q, BLOCK_G)
    bb = b.to(tl.int64)
    x = tl.load(x_ptr + bb * N + e, mask=mask, other=0.0)
    p = tl.load(mo_ptr + bb * stride_mo + e, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        z = tl.load(noise_ptr + bb * N + e, mask=mask, other=0.0)
    else:
        seed, sample_base, _ = load_key(key_ptr, seed, sample_base, t, HAS_KEY)
        z = normal_quarters(seed, sample_base + b, t, STREAM, g)

    px0 = predict_x0(x, p, sra, srm1, sa, s1ma, PREDICTION, CLIP)
    if DDIM:
        # Song et al. eq. (12): σ = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_{t−1}))
        abar = coef(table_ptr, T, t, ROW_AC)
        abar_prev = coef(table_ptr, T, t, ROW_AC_PREV)
        sigma = eta * tl.math.sqrt_rn(
            tl.math.div_rn(1.0 - abar_prev, 1.0 - abar) * (1.0 - tl.math.div_rn(abar, abar_prev)))
        dir_coef = tl.math.sqrt_rn(tl.maximum((1.0 - abar_prev) - sigma * sigma, 0.0))
        eps = tl.math.div_rn(sra * x - px0, srm1)
        out = (tl.math.sqrt_rn(abar_prev) * px0 + dir_coef * eps) + (nz * sigma) * z
    else:
        mean = coef(table_ptr, T, t, ROW_PM_COEF1) * px0 + coef(table_ptr, T, t, ROW_PM_COEF2) * x
        if VARIANCE == 2:
            v = tl.load(mo_ptr + bb * stride_mo + N + e, mask=mask, other=0.0).to(tl.float32)
            lv = learned_log_variance(v, coef(table_ptr, T, t, ROW_LOG_BETAS), coef(table_ptr, T, t, ROW_POST_LOGVAR))
            out = mean + (nz * tl.exp(0.5 * lv)) * z
        else:
            if VARIANCE == 1:
                lv = coef(table_ptr, T, t, ROW_LOG_LARGE_VAR)
            else:
                lv = coef(table_ptr, T, t, ROW_POST_LOGVAR)
            out = mean + (nz * tl.exp(0.5 * lv)) * z
    tl.store(out_ptr + bb * N + e, out, mask=mask)


def reverse_step(x_t, model_out, t, table, noise=None, seed: int = 0, sample_base: int = 0, *,
                 prediction: str, variance: str, clip_denoised: bool, eta: float | None = None,
                 key: torch.Tensor | None = None, block_g: int | None = None) -> torch.Tensor:
    """x_{t−1} (float32, x_t's shape), exactly `reference.reverse_step`.

    x_t: float32 [B, ...] (copied if not contiguous). model_out: float32/float16/bfloat16
    [B, ...] with N elements per sample, or 2N with ``variance="learned_range"`` (the variance
    values start N elements after the sample's mean prediction); any batch stride, each sample
    dense (copied otherwise). t: int64 [B], each in [0, T) (not checked: that would sync).
    table: `Coefficients.table` float32 [R, T]. noise: float32 [B, ...] with N elements per
    sample, or None to draw z from the noise contract at (seed, sample_base + b, t[b],
    STREAM_REVERSE). ``key``: int64 [seed, sample_base, step] on the device, read by the kernel
    instead of the scalars (its step is unused: the step is t[b]). ``block_g``: group indices
    per program (a power of two; tuning only).
    """
    U.check_batch(x_t, "x_t")
    device = x_t.device
    x_t = U.check_image(x_t, "x_t", device)
    B, N = x_t.shape[0], U.per_sample_numel(x_t)
    pred_i = U.enum(prediction, U.PREDICTIONS, "prediction")
    var_i = U.enum(variance, U.VARIANCES, "variance")
    if not isinstance(clip_denoised, bool):
        raise ValueError(f"clip_denoised must be a bool, got {clip_denoised!r}")
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0):
        raise ValueError(f"eta must be None (DDPM) or a non-negative float (DDIM), got {eta!r}")
    model_out, stride_mo = U.check_model(model_out, "model_out", device, B, N, (2,) if var_i == 2 else (1,))
    t = U.check_t(t, B, device)
    table = U.check_table(table, device)
    if noise is not None:
        noise = U.check_noise(noise, B, N, device)
    seed_i, base, _, key = U.coordinates(seed, sample_base, 0, key, device)
    if noise is not None:
        key = None  # unused

    out = torch.empty_like(x_t)
    Q = U.quarter(N)
    blk = U.block_g(Q, block_g)
    R = U.ROW
    U.launcher(_reverse_step_kernel)[(triton.cdiv(Q, blk), B)](
        x_t, model_out, t, table, noise if noise is not None else x_t, key if key is not None else t, out,
        seed_i, base, float(eta) if eta is not None else 0.0,
        N, Q, stride_mo, table.shape[1],
        PREDICTION=pred_i, VARIANCE=var_i, CLIP=clip_denoised, DDIM=eta is not None,
        HAS_NOISE=noise is not None, HAS_KEY=key is not None, STREAM=STREAM_REVERSE, BLOCK_G=blk,
        ROW_SQRT_RECIP_AC=R["sqrt_recip_alphas_cumprod"], ROW_SQRT_RECIPM1_AC=R["sqrt_recipm1_alphas_cumprod"],
        ROW_SQRT_AC=R["sqrt_alphas_cumprod"], ROW_SQRT_1M_AC=R["sqrt_one_minus_alphas_cumprod"],
        ROW_PM_COEF1=R["posterior_mean_coef1"], ROW_PM_COEF2=R["posterior_mean_coef2"],
        ROW_LOG_BETAS=R["log_betas"], ROW_POST_LOGVAR=R["posterior_log_variance_clipped"],
        ROW_LOG_LARGE_VAR=R["log_large_variance"], ROW_AC=R["alphas_cumprod"], ROW_AC_PREV=R["alphas_cumprod_prev"],
        num_warps=U.num_warps(blk),
    )
    return out
