"""vlb_terms: the per-sample terms of the variational bound in bits/dim — eq. (5), fused.

    torch.ops.fastddpm.vlb_terms(model_out, x0, x_t, t, table, prediction, variance, clip_denoised,
                                 levels) -> bits/dim [B]

L_{t−1} = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) where t > 0 and the decoder
L_0 = −log p_θ(x_0|x_1) (a discretized Gaussian over ``levels`` values) where t = 0, averaged
over the elements and divided by ln 2 — `fastddpm.reference.vlb_terms`. model_out as for
`reverse_step`; x0, x_t: float32 (or float64) [B, ...]. Differentiable in model_out (its
backward differentiates the reference: the bound's gradient is only needed when training with
loss="vlb"/"hybrid"). Per-sample sums are deterministic: per-block partial sums, then a
fixed-order sum, no atomics.

In the Triton kernel the middle bins take Φ(upper) − Φ(lower) on the side away from the tail,
clamped at 1e-12, with Φ(x) = (1 + erf(x/√2))/2 (`tl.math.erf`, as `torch.special.ndtr`) for
x >= −1 and erfc(−x/√2)/2 below. torch's ndtr is the erf form everywhere, so its tail values
are only accurate to ~6e-8 absolute; there the kernel agrees with the float64 reference rather
than the float32 one. The edge bins use log Φ as `torch.special.log_ndtr`. erfc/erfcx come from
a Chebyshev fit (Numerical Recipes `erfcc`, fractional error < 1.2e-7): libdevice's erfc/erfcx
are extern calls, which the interpreter cannot run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastddpm import options, reference
from fastddpm.schedule import Coefficients

from . import checks, library
from . import triton_common as tc
from .triton_common import HAS_TRITON, tl, triton

NAME = "vlb_terms"


def check(model_out, x0, x_t, t, table, prediction, variance, clip_denoised, levels) -> torch.dtype:
    """The images' dtype, once every argument is checked."""
    checks.choices(NAME, prediction, variance, clip_denoised)
    checks.levels(NAME, levels)
    dtype = checks.images(NAME, x0=x0, x_t=x_t).dtype
    checks.model_output(NAME, model_out, x0, learned=variance == "learned_range")
    checks.timesteps_and_table(NAME, t, table, x0)
    return dtype


def reference_vlb_terms(
    model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, table: Tensor, prediction: str, variance: str,
    clip_denoised: bool, levels: int,
) -> Tensor:
    return reference.vlb_terms(model_out.to(x0.dtype), x0, x_t, t, Coefficients.from_table(table),
                               prediction=prediction, variance=variance, clip_denoised=clip_denoised, levels=levels)


# ---- native (CPU) -------------------------------------------------------------------------


def native_vlb_terms(model_out, x0, x_t, t, table, prediction, variance, clip_denoised, levels):
    x0, x_t, t, table = x0.contiguous(), x_t.contiguous(), t.contiguous(), table.contiguous()
    model_out = model_out if library.dense_rows(model_out) else model_out.contiguous()
    out = x0.new_empty(x0.shape[0])
    library.native.vlb_terms(
        out.data_ptr(), model_out.data_ptr(), options.code(model_out.dtype, options.MODEL_DTYPES),
        library.batch_stride(model_out), x0.data_ptr(), x_t.data_ptr(), t.data_ptr(), table.data_ptr(), table.shape[1], x0.shape[0],
        library.per_sample_numel(x0), options.code(prediction, options.PREDICTIONS),
        options.code(variance, options.VARIANCES), clip_denoised, levels)
    return out


# ---- Triton (CUDA) ------------------------------------------------------------------------


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
def _vlb_terms_kernel(
    mo_ptr, x0_ptr, xt_ptr, t_ptr, table_ptr, partial_ptr, half_bin, lo_edge, hi_edge, scale,
    N, Q, T, blocks, mo_stride_b, mo_var, HW, mo_stride_c, mo_stride_p,
    PREDICTION: tl.constexpr, VARIANCE: tl.constexpr, CLIP: tl.constexpr, STRIDED: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    b, g = tc.sample_and_groups(blocks, BLOCK_G)
    t, ok = tc.timestep(t_ptr, b, T)
    c1 = tc.coef(table_ptr, T, t, ok, tc.ROW_POSTERIOR_MEAN_COEF1)
    c2 = tc.coef(table_ptr, T, t, ok, tc.ROW_POSTERIOR_MEAN_COEF2)
    log_tilde = tc.coef(table_ptr, T, t, ok, tc.ROW_POSTERIOR_LOG_VARIANCE_CLIPPED)  # the true posterior's
    row = b.to(tl.int64) * N
    mo_row = b.to(tl.int64) * mo_stride_b
    total = 0.0
    for j in tl.static_range(4):
        e, mask = tc.quarter(j, g, N, Q)
        x0 = tl.load(x0_ptr + row + e, mask=mask, other=0.0)
        xt = tl.load(xt_ptr + row + e, mask=mask, other=0.0)
        mo = mo_ptr + mo_row + tc.model_offsets(e, HW, mo_stride_c, mo_stride_p, STRIDED)
        px0 = tc.predict_x0(xt, tl.load(mo, mask=mask, other=0.0).to(tl.float32), table_ptr, T, t, ok, PREDICTION, CLIP)
        mean = c1 * px0 + c2 * xt
        v = tl.load(mo + mo_var, mask=mask, other=0.0).to(tl.float32) if VARIANCE == tc.LEARNED_RANGE else 0.0
        lv = tc.log_variance(v, table_ptr, T, t, ok, VARIANCE)
        if t == 0:
            term = -_decoder_ll(x0, mean, 0.5 * lv, half_bin, lo_edge, hi_edge)
        else:
            d = (c1 * x0 + c2 * xt) - mean
            term = 0.5 * ((((-1.0 + lv) - log_tilde) + tl.exp(log_tilde - lv)) + (d * d) * tl.exp(-lv))
        total += tl.sum(tl.where(mask, term, 0.0), axis=0)
    tl.store(partial_ptr + tl.program_id(0), total * scale)


def triton_vlb_terms(model_out, x0, x_t, t, table, prediction, variance, clip_denoised, levels):
    x0, x_t, t, table = x0.contiguous(), x_t.contiguous(), t.contiguous(), table.contiguous()
    model_out, layout, strided = tc.model_layout(model_out, x0)
    L = tc.launch_plan(x0)
    partial = torch.empty(L.B, L.blocks, device=x0.device, dtype=torch.float32)
    half_bin = 1.0 / (levels - 1)  # the thresholds as the reference computes them: in double, then float32
    tc.launch(_vlb_terms_kernel, L.grid, x0.device, model_out, x0, x_t, t, table, partial, half_bin, -1 + half_bin,
              1 - half_bin, 1.0 / (L.N * math.log(2.0)), L.N, L.Q, table.shape[1], L.blocks, *layout,
              PREDICTION=options.code(prediction, options.PREDICTIONS),
              VARIANCE=options.code(variance, options.VARIANCES), CLIP=clip_denoised, STRIDED=strided,
              BLOCK_G=L.block, num_warps=L.warps)
    return partial[:, 0] if L.blocks == 1 else partial.sum(dim=1)


# ---- the operator ---------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    model_out, x0, x_t, t, table, *options_ = inputs
    ctx.save_for_backward(model_out, x0, x_t, t, table)
    ctx.options = options_


def _backward(ctx, grad):
    """Recompute the bound through the reference and differentiate it."""
    model_out, x0, x_t, t, table = ctx.saved_tensors
    with torch.enable_grad():
        out = model_out.detach().requires_grad_()
        terms = reference_vlb_terms(out, x0, x_t, t, table, *ctx.options)
        (grad_out,) = torch.autograd.grad(terms, out, grad)
    return grad_out, None, None, None, None, None, None, None, None


op = library.define(NAME, reference_vlb_terms, check, library.per_sample, cpu=native_vlb_terms,
                    cuda=triton_vlb_terms if HAS_TRITON else None, backward=_backward, setup_context=_setup_context)
