"""reverse_step: x_{t−1} from x_t and the model output, one step of the reverse process, fused.

    torch.ops.fastddpm.reverse_step(x_t, model_out, t, table, noise, key, prediction, variance,
                                    clip_denoised, eta, guidance=None) -> x_{t−1}

Ancestral DDPM (Algorithm 2: x_{t−1} = μ_θ + σ_t z) when ``eta`` is None, DDIM(η) otherwise:
x̂_0 from the ε, x_0 or v prediction, optionally clipped to [−1, 1], the posterior mean
μ̃_t(x̂_0, x_t) and fixed_small / fixed_large / learned_range σ_t — `fastddpm.reference.
reverse_step`; no noise where t[b] = 0. x_t: float32 (or float64) [B, ...]. model_out: x_t's
shape (twice its channels with learned_range), float32, float16 or bfloat16, dense or
channels-last. noise: z like x_t, or None to draw the contract's z at (seed, sample_base + b,
t[b], STREAM_REVERSE) from key (its step is unused). guidance: classifier-free guidance's w, with
model_out [2B, ...], the conditional branch's B rows then the unconditional one's: the step
reads ε_u + w (ε_c − ε_u) (and the conditional variance values) — `reference.guided_output`.
Not differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastddpm import options, reference, rng
from fastddpm.schedule import Coefficients

from . import checks, library
from . import triton_common as tc
from .triton_common import HAS_TRITON, tl, triton

NAME = "reverse_step"


def check(x_t, model_out, t, table, noise, key, prediction, variance, clip_denoised, eta, guidance=None) -> torch.dtype:
    """The images' dtype, once every argument is checked."""
    checks.choices(NAME, prediction, variance, clip_denoised)
    checks.eta(NAME, eta)
    checks.guidance(NAME, guidance)
    dtype = checks.images(NAME, x_t=x_t, noise=noise).dtype
    checks.model_output(NAME, model_out, x_t, learned=variance == "learned_range", guided=guidance is not None)
    checks.timesteps_and_table(NAME, t, table, x_t)
    checks.key(NAME, key, noise, x_t)
    return dtype


def reference_reverse_step(
    x_t: Tensor, model_out: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor], key: Optional[Tensor],
    prediction: str, variance: str, clip_denoised: bool, eta: Optional[float], guidance: Optional[float] = None,
) -> Tensor:
    if noise is None:
        noise = rng.normal_at_key(key, x_t, rng.STREAM_REVERSE, step=t)
    return reference.reverse_step(x_t, model_out.to(x_t.dtype), t, noise, Coefficients.from_table(table),
                                  prediction=prediction, variance=variance, clip_denoised=clip_denoised, eta=eta,
                                  guidance=guidance)


# ---- native (CPU) -------------------------------------------------------------------------


def native_reverse_step(x_t, model_out, t, table, noise, key, prediction, variance, clip_denoised, eta, guidance=None):
    x_t, t, table = x_t.contiguous(), t.contiguous(), table.contiguous()
    model_out = model_out if library.dense_rows(model_out) else model_out.contiguous()
    out = torch.empty_like(x_t)
    noise = None if noise is None else noise.contiguous()
    seed, sample_base, _ = rng.unpack_key(key) if noise is None else (0, 0, 0)
    library.native.reverse_step(
        out.data_ptr(), x_t.data_ptr(), model_out.data_ptr(), options.code(model_out.dtype, options.MODEL_DTYPES),
        library.batch_stride(model_out), t.data_ptr(), table.data_ptr(), table.shape[1], x_t.shape[0],
        library.per_sample_numel(x_t), 0 if noise is None else noise.data_ptr(), seed, sample_base,
        options.code(prediction, options.PREDICTIONS), options.code(variance, options.VARIANCES), clip_denoised,
        eta is not None, 0.0 if eta is None else eta, guidance is not None, 0.0 if guidance is None else guidance)
    return out


# ---- Triton (CUDA) ------------------------------------------------------------------------


@triton.jit
def _reverse_step_kernel(
    x_ptr, mo_ptr, t_ptr, table_ptr, noise_ptr, key_ptr, out_ptr, eta, w,
    N, Q, T, blocks, mo_stride_b, mo_uncond, mo_var, HW, mo_stride_c, mo_stride_p,
    PREDICTION: tl.constexpr, VARIANCE: tl.constexpr, CLIP: tl.constexpr, DDIM: tl.constexpr,
    HAS_NOISE: tl.constexpr, STRIDED: tl.constexpr, GUIDED: tl.constexpr, BLOCK_G: tl.constexpr,
):
    b, g = tc.sample_and_groups(blocks, BLOCK_G)
    t, ok = tc.timestep(t_ptr, b, T)
    nonzero = (t > 0).to(tl.float32)  # no noise at t = 0
    if DDIM:
        # σ = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_{t−1})) — Song et al. 2021, eq. (16)
        abar = tc.coef(table_ptr, T, t, ok, tc.ROW_ALPHAS_CUMPROD)
        abar_prev = tc.coef(table_ptr, T, t, ok, tc.ROW_ALPHAS_CUMPROD_PREV)
        sigma = eta * tl.math.sqrt_rn(
            tl.math.div_rn(1.0 - abar_prev, 1.0 - abar) * (1.0 - tl.math.div_rn(abar, abar_prev)))
        mean_x0 = tl.math.sqrt_rn(abar_prev)
        mean_eps = tl.math.sqrt_rn(tl.maximum((1.0 - abar_prev) - sigma * sigma, 0.0))
        sra = tc.coef(table_ptr, T, t, ok, tc.ROW_SQRT_RECIP_ALPHAS_CUMPROD)
        srm1 = tc.coef(table_ptr, T, t, ok, tc.ROW_SQRT_RECIPM1_ALPHAS_CUMPROD)
    else:
        mean_x0 = tc.coef(table_ptr, T, t, ok, tc.ROW_POSTERIOR_MEAN_COEF1)
        mean_xt = tc.coef(table_ptr, T, t, ok, tc.ROW_POSTERIOR_MEAN_COEF2)
    row = b.to(tl.int64) * N
    mo_row = b.to(tl.int64) * mo_stride_b
    drawn = tc.draw_normals(key_ptr, b, t, g, tc.REVERSE, not HAS_NOISE)
    for j in tl.static_range(4):
        e, mask, z = tc.quarter_and_noise(j, g, N, Q, noise_ptr + row, drawn, HAS_NOISE)
        x = tl.load(x_ptr + row + e, mask=mask, other=0.0)
        mo = mo_ptr + mo_row + tc.model_offsets(e, HW, mo_stride_c, mo_stride_p, STRIDED)
        p = tc.model_prediction(mo, mask, mo_uncond, w, GUIDED)
        px0 = tc.predict_x0(x, p, table_ptr, T, t, ok, PREDICTION, CLIP)
        if DDIM:
            eps = tl.math.div_rn(sra * x - px0, srm1)
            out = (mean_x0 * px0 + mean_eps * eps) + (nonzero * sigma) * z
        else:
            v = tl.load(mo + mo_var, mask=mask, other=0.0).to(tl.float32) if VARIANCE == tc.LEARNED_RANGE else 0.0
            lv = tc.log_variance(v, table_ptr, T, t, ok, VARIANCE)
            out = (mean_x0 * px0 + mean_xt * x) + (nonzero * tl.exp(0.5 * lv)) * z  # μ̃_t + σ_t z — eq. (7)
        tl.store(out_ptr + row + e, out, mask=mask)


def triton_reverse_step(x_t, model_out, t, table, noise, key, prediction, variance, clip_denoised, eta, guidance=None):
    x_t, t, table = x_t.contiguous(), t.contiguous(), table.contiguous()
    noise = None if noise is None else noise.contiguous()
    model_out, (stride_b, *layout), strided = tc.model_layout(model_out, x_t)
    out, L = torch.empty_like(x_t), tc.launch_plan(x_t)
    tc.launch(_reverse_step_kernel, L.grid, x_t.device, x_t, model_out, t, table, x_t if noise is None else noise,
              t if key is None else key, out, 0.0 if eta is None else float(eta),
              0.0 if guidance is None else float(guidance), L.N, L.Q, table.shape[1], L.blocks, stride_b,
              L.B * stride_b, *layout, PREDICTION=options.code(prediction, options.PREDICTIONS),
              VARIANCE=options.code(variance, options.VARIANCES), CLIP=clip_denoised, DDIM=eta is not None,
              HAS_NOISE=noise is not None, STRIDED=strided, GUIDED=guidance is not None, BLOCK_G=L.block,
              num_warps=L.warps)
    return out


op = library.define(NAME, reference_reverse_step, check, library.like, cpu=native_reverse_step,
                    cuda=triton_reverse_step if HAS_TRITON else None)
